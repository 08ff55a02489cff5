//! The WebSocket IO loop on monoio's owned buffers, shared by the gateway
//! (server role) and the receiver (client role). Framing itself is the
//! sans-IO [`super::frame`]; this file only moves bytes.
//!
//! The writer task sends everything queued since its last wakeup with one
//! write (write batching). On a plain TCP socket in the server role it is
//! one `writev`: WebSocket headers, frame heads and small messages are
//! gathered into one buffer, and body buffers ([`Outgoing::Parts`], large
//! binary messages) go out as their own iovecs, never copied. So it is in
//! the client role towards a gateway that negotiated `zeromask` (the
//! all-zero key leaves the payload as it is). With random masking
//! (client role: RFC 6455 needs a private copy to XOR) or TLS (rustls
//! encrypts into its own buffer, and monoio-rustls's `writev` sends only
//! the first iovec) each message is copied once into the batch instead.
//! Never blocks the runtime; never touches another core's state.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

use super::frame::{
    apply_mask, encode_close, encode_header, Decoder, Event, Masking, OpCodeKind as OpCode, Role,
};
use super::WsError;
use crate::net::Readable;
use crate::pool::FreeList;

/// Something for the writer task to send.
#[derive(Debug)]
pub enum Outgoing {
    /// One binary message (an ANPX frame).
    Binary(BytesMut),
    /// One binary message whose body is a buffer of its own, so it is not
    /// copied: the payload is `head[..split] ++ body ++ head[split..]`
    /// ([`crate::protocol::anpx::encode_frame_split`]). `head` goes back to
    /// the frame-head pool once written.
    Parts {
        head: BytesMut,
        split: usize,
        body: Bytes,
    },
    /// Bytes written as they are (the 101 response head).
    Raw(Vec<u8>),
    /// A text message (JSON control message, PROTOCOL.md §6).
    Text(Vec<u8>),
    Ping(Bytes),
    Pong(Bytes),
    /// Close handshake; the writer stops after sending it.
    Close(u16, String),
}

pub type OutTx = super::queue::Tx<Outgoing>;
pub type OutRx = super::queue::Rx<Outgoing>;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("websocket protocol: {0}")]
    Ws(#[from] WsError),
    #[error("peer closed the connection")]
    Eof,
    #[error("peer silent for {0:?}")]
    Idle(Duration),
}

/// Reads WebSocket events from one connection.
///
/// The read buffer is lent by this thread's pool ([`READS`]) while bytes
/// come, and given back when everything read has been decoded and the
/// caller expects nothing soon (`next(false)`): the reader then waits for
/// readiness holding no buffer ([`crate::net::Readable`]), so an idle
/// tunnel costs no read buffer. It grows on demand for a large message;
/// one grown past [`READ_KEEP_MAX`] is not kept by the pool.
pub struct WsReader<R> {
    io: R,
    /// Empty, without capacity, while idle.
    buf: BytesMut,
    decoder: Decoder,
    idle: Option<Duration>,
}

const READ_CHUNK: usize = 64 * 1024;
/// What a buffer new from the allocator starts with (the pool was empty):
/// small, because many tunnels waking at once for a ping or a handshake
/// each take one (a reconnect storm, a ping round), and what they took at
/// that peak the allocator keeps resident afterwards. A buffer grows to
/// [`READ_CHUNK`] at its second read; the pool keeps the grown ones.
const FRESH: usize = 4 * 1024;
/// Read buffers larger than this are not kept by the pool.
const READ_KEEP_MAX: usize = 2 * READ_CHUNK;
/// Buffers of each kind (reads, write batches) kept per thread: at most
/// this many idle 64 KiB buffers stay allocated on a core after a burst.
const POOL_KEEP: usize = 64;

thread_local! {
    /// Tunnel read buffers of this thread (a core's runtime).
    static READS: FreeList<BytesMut> = const { FreeList::new(POOL_KEEP) };
    /// Write batches of the copying writer.
    static BATCHES: FreeList<BytesMut> = const { FreeList::new(POOL_KEEP) };
    /// Write batches of the vectored writer.
    static GATHERS: FreeList<Gather> = const { FreeList::new(POOL_KEEP) };
}

/// Largest read buffer grown for a run of large frames.
const READ_BIG_MAX: usize = 1024 * 1024;

/// How much room to reserve when the buffer holds `len` bytes of the
/// frame being read and it needs `needed` more: the `additional` for
/// [`BytesMut::reserve`]. Growing a buffer that decoded frames still
/// point into (their bodies wait to be written) allocates a new one and
/// copies what it holds, the start of the frame being read. A frame
/// larger than a quarter of [`READ_CHUNK`] (a 64 KiB body piece) straddles
/// nearly every buffer sized for one such frame, which then copies half a
/// frame per frame on average (~7 % of the gateway's CPU at 64 KiB
/// responses). Room for four such frames makes that copy happen once per
/// four frames; capped at [`READ_BIG_MAX`], never kept by the pool
/// ([`READ_KEEP_MAX`]).
fn grow_by(len: usize, needed: usize) -> usize {
    // What the buffer holds is the start of the frame being read (decoded
    // frames were split off), so `len + needed` is that frame's size.
    if len + needed > READ_CHUNK / 4 {
        let target = ((len + needed) * 4).clamp(READ_CHUNK, READ_BIG_MAX);
        target.saturating_sub(len).max(needed)
    } else {
        READ_CHUNK
    }
}

/// An empty read buffer: a pooled one of [`READ_CHUNK`] bytes, else a
/// [`FRESH`] one.
fn take_read() -> BytesMut {
    READS
        .with(|p| p.take())
        .unwrap_or_else(|| BytesMut::with_capacity(FRESH))
}

/// Gives an emptied read buffer back. One that frames still point into
/// (their `Bytes` keep the storage) or that grew large is dropped instead.
fn give_read(mut b: BytesMut) {
    debug_assert!(b.is_empty());
    // `try_reclaim` succeeds only when no `Bytes` still shares the storage.
    // A full-size buffer must offer READ_CHUNK again, a fresh one FRESH.
    let want = if b.capacity() >= READ_CHUNK {
        READ_CHUNK
    } else {
        FRESH
    };
    if b.capacity() <= READ_KEEP_MAX && b.try_reclaim(want) {
        READS.with(|p| p.give(b));
    }
}

impl<R: AsyncReadRent + Readable> WsReader<R> {
    /// `leftover`: bytes already read past the handshake.
    pub fn new(io: R, leftover: BytesMut, decoder: Decoder, idle: Option<Duration>) -> Self {
        // The handshake's buffer is not the pool's: keep it only if it
        // holds bytes to decode.
        let buf = if leftover.is_empty() {
            BytesMut::new()
        } else {
            leftover
        };
        Self {
            io,
            buf,
            decoder,
            idle,
        }
    }

    /// The next event; `Err(Idle)` when the peer sent nothing (not even a
    /// pong) for the idle window. `busy`: frames are expected soon (the
    /// role has requests in flight), so a wait keeps the read buffer and
    /// reads straight into it; otherwise a wait with nothing buffered
    /// gives the buffer back and waits for readiness first.
    pub async fn next(&mut self, busy: bool) -> Result<Event, ConnError> {
        loop {
            if let Some(ev) = self.decoder.decode(&mut self.buf)? {
                return Ok(ev);
            }
            if self.buf.is_empty() && !busy {
                if self.buf.capacity() > 0 {
                    give_read(std::mem::take(&mut self.buf));
                }
                let ready = self.io.wait_readable();
                let ready = match self.idle {
                    Some(d) => match monoio::time::timeout(d, ready).await {
                        Ok(r) => r,
                        Err(_) => return Err(ConnError::Idle(d)),
                    },
                    None => ready.await,
                };
                ready?;
            }
            if self.buf.capacity() == 0 {
                self.buf = take_read();
            }
            let room = self.buf.capacity() - self.buf.len();
            let needed = self.decoder.needed();
            if room < READ_CHUNK / 4 || room < needed {
                let more = grow_by(self.buf.len(), needed);
                crate::net::reserve_live(&mut self.buf, more);
            }
            let buf = std::mem::take(&mut self.buf);
            let (res, buf) = match self.idle {
                Some(d) => {
                    match monoio::time::timeout(d, crate::net::read_append(&mut self.io, buf)).await
                    {
                        Ok(r) => r,
                        Err(_) => return Err(ConnError::Idle(d)),
                    }
                }
                None => crate::net::read_append(&mut self.io, buf).await,
            };
            self.buf = buf;
            match res {
                Ok(0) => return Err(ConnError::Eof),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether a read buffer is held (tests; an idle reader holds none).
    #[cfg(test)]
    pub fn holds_buffer(&self) -> bool {
        self.buf.capacity() > 0
    }
}

impl<R> Drop for WsReader<R> {
    fn drop(&mut self) {
        let b = std::mem::take(&mut self.buf);
        if b.is_empty() && b.capacity() > 0 {
            give_read(b);
        }
    }
}

/// Most bytes gathered into one write.
const BATCH_MAX: usize = 1024 * 1024;
/// Most iovecs in one `writev` (IOV_MAX is 1024 on Linux).
const IOV_MAX: usize = 512;
/// Binary messages up to this size are copied into the gathered buffer;
/// larger ones go out as their own iovec.
const COPY_MAX: usize = 2048;

/// Sends queued messages until the queue closes or a Close is sent.
/// `vectored`: the socket is plain TCP (see the module docs); used unless
/// masking must transform the bytes.
pub async fn run_writer<W: AsyncWriteRent>(
    io: W,
    rx: OutRx,
    masking: Masking,
    vectored: bool,
) -> io::Result<()> {
    if vectored && !masking.transforms() {
        run_vectored(io, rx, masking).await
    } else {
        run_copying(io, rx, masking).await
    }
}

/// How long a writer keeps its batch after the last message: a tunnel
/// with traffic reuses it from one wakeup to the next, and one that went
/// quiet gives it back to the pool (an idle tunnel holds no write buffer).
const BATCH_LINGER: Duration = Duration::from_secs(1);

/// The next message to send. While one comes within [`BATCH_LINGER`] the
/// writer keeps `held`; after that `held` goes back to the pool through
/// `give` and the wait goes on holding nothing. None: the queue closed.
async fn next_message<B>(rx: &mut OutRx, held: &mut Option<B>, give: fn(B)) -> Option<Outgoing> {
    if let Ok(m) = rx.try_recv() {
        return Some(m);
    }
    if held.is_some() {
        // A channel receive is cancel-safe: the timeout loses nothing.
        if let Ok(m) = monoio::time::timeout(BATCH_LINGER, rx.recv()).await {
            return m;
        }
        if let Some(b) = held.take() {
            give(b);
        }
    }
    rx.recv().await
}

fn take_batch() -> BytesMut {
    BATCHES
        .with(|p| p.take())
        .unwrap_or_else(|| BytesMut::with_capacity(FRESH))
}

/// A batch that grew past [`READ_KEEP_MAX`] (large bodies copied in) is
/// dropped rather than kept.
fn give_batch(mut b: BytesMut) {
    b.clear();
    if b.capacity() <= READ_KEEP_MAX {
        BATCHES.with(|p| p.give(b));
    }
}

/// Copying writer: each wakeup's messages are encoded (and masked) into
/// one buffer, sent with one `write_all`.
async fn run_copying<W: AsyncWriteRent>(
    mut io: W,
    mut rx: OutRx,
    masking: Masking,
) -> io::Result<()> {
    let mut held: Option<BytesMut> = None;
    while let Some(first) = next_message(&mut rx, &mut held, give_batch).await {
        let mut batch = held.take().unwrap_or_else(take_batch);
        let mut closing = encode_outgoing(&mut batch, masking, first);
        while !closing && batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(m) => closing = encode_outgoing(&mut batch, masking, m),
                Err(_) => break,
            }
        }
        let (res, mut b) = io.write_all(batch).await;
        res?;
        b.clear();
        held = Some(b);
        if closing {
            break;
        }
    }
    if let Some(b) = held {
        give_batch(b);
    }
    let _ = io.shutdown().await;
    Ok(())
}

/// Appends one message to the batch; true if it was a Close.
fn encode_outgoing(batch: &mut BytesMut, masking: Masking, m: Outgoing) -> bool {
    let mask = masking.key();
    let (op, payload): (OpCode, &[u8]) = match &m {
        Outgoing::Binary(b) => (OpCode::Binary, b),
        Outgoing::Text(b) => (OpCode::Text, b),
        Outgoing::Ping(b) => (OpCode::Ping, b),
        Outgoing::Pong(b) => (OpCode::Pong, b),
        Outgoing::Raw(b) => {
            batch.extend_from_slice(b);
            return false;
        }
        Outgoing::Close(code, reason) => {
            let role = match masking {
                Masking::Unmasked => Role::Server,
                Masking::Random | Masking::Zero => Role::Client,
            };
            encode_close(batch, role, *code, reason);
            return true;
        }
        Outgoing::Parts { head, split, body } => {
            encode_header(batch, OpCode::Binary, true, head.len() + body.len(), mask);
            // The one copy: masking (client role) or TLS needs the bytes
            // in a buffer of their own.
            let start = batch.len();
            batch.extend_from_slice(&head[..*split]);
            batch.extend_from_slice(body);
            batch.extend_from_slice(&head[*split..]);
            if let Some(key) = mask {
                apply_mask(&mut batch[start..], key);
            }
            if let Outgoing::Parts { head, .. } = m {
                crate::pool::frame_heads::give(head);
            }
            return false;
        }
    };
    encode_header(batch, op, true, payload.len(), mask);
    let start = batch.len();
    batch.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut batch[start..], key);
    }
    // A frame copied into the batch: its buffer serves the next one
    // (the encoders take theirs from this pool; large ones are dropped).
    if let Outgoing::Binary(b) = m {
        crate::pool::frame_heads::give(b);
    }
    false
}

/// One `writev`'s worth: a gathered buffer of small pieces and the body
/// buffers between them, in order.
struct Gather {
    /// Unmasked (server role) or the zero key (`zeromask`).
    masking: Masking,
    small: BytesMut,
    /// In order: a range of `small`, or a body.
    segs: Vec<Seg>,
    bodies: Vec<Bytes>,
    iov: Vec<libc::iovec>,
    /// First iovec not yet fully written.
    iov_at: usize,
    /// Where the current run of small pieces started in `small`.
    run: usize,
    bytes: usize,
}

enum Seg {
    Small(usize, usize),
    Body(usize),
}

// SAFETY: `iov` points into `small` and `bodies`, which are not touched
// (no push, no reallocation) between `seal` and the end of the write that
// owns this value; the heap storage of `iov` itself does not move while
// the runtime owns the value.
unsafe impl monoio::buf::IoVecBuf for Gather {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov[self.iov_at..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iov.len() - self.iov_at
    }
}

impl Gather {
    fn new() -> Self {
        Self {
            masking: Masking::Unmasked,
            small: BytesMut::with_capacity(FRESH),
            segs: Vec::with_capacity(8),
            bodies: Vec::with_capacity(8),
            iov: Vec::with_capacity(8),
            iov_at: 0,
            run: 0,
            bytes: 0,
        }
    }

    fn full(&self) -> bool {
        self.bytes >= BATCH_MAX || self.segs.len() + 3 >= IOV_MAX
    }

    fn body(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        if self.small.len() > self.run {
            self.segs.push(Seg::Small(self.run, self.small.len()));
        }
        self.bytes += b.len();
        self.segs.push(Seg::Body(self.bodies.len()));
        self.bodies.push(b);
        self.run = self.small.len();
    }

    /// Appends one message; true if it was a Close.
    fn push(&mut self, m: Outgoing) -> bool {
        let before = self.small.len();
        let closing = match m {
            Outgoing::Parts { head, split, body } => {
                let len = head.len() + body.len();
                encode_header(
                    &mut self.small,
                    OpCode::Binary,
                    true,
                    len,
                    self.masking.key(),
                );
                self.small.extend_from_slice(&head[..split]);
                self.body(body);
                self.small.extend_from_slice(&head[split..]);
                crate::pool::frame_heads::give(head);
                false
            }
            Outgoing::Binary(b) if b.len() > COPY_MAX => {
                encode_header(
                    &mut self.small,
                    OpCode::Binary,
                    true,
                    b.len(),
                    self.masking.key(),
                );
                self.body(b.freeze());
                false
            }
            m => encode_outgoing(&mut self.small, self.masking, m),
        };
        self.bytes += self.small.len() - before;
        closing
    }

    /// Builds the iovecs; nothing may be pushed after this until `reset`.
    fn seal(&mut self) {
        if self.small.len() > self.run {
            self.segs.push(Seg::Small(self.run, self.small.len()));
        }
        self.iov.clear();
        for s in &self.segs {
            let (ptr, len) = match *s {
                Seg::Small(a, b) => (self.small[a..b].as_ptr(), b - a),
                Seg::Body(i) => (self.bodies[i].as_ptr(), self.bodies[i].len()),
            };
            self.iov.push(libc::iovec {
                iov_base: ptr as *mut libc::c_void,
                iov_len: len,
            });
        }
    }

    /// Marks `n` more bytes written; true when everything is.
    fn advance(&mut self, mut n: usize) -> bool {
        while let Some(v) = self.iov.get_mut(self.iov_at) {
            if n < v.iov_len {
                // SAFETY: n < iov_len, so the new base stays inside the buffer.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                return false;
            }
            n -= v.iov_len;
            self.iov_at += 1;
        }
        true
    }

    fn reset(&mut self) {
        self.small.clear();
        self.segs.clear();
        self.bodies.clear();
        self.iov.clear();
        self.iov_at = 0;
        self.run = 0;
        self.bytes = 0;
    }
}

fn take_gather() -> Gather {
    GATHERS.with(|p| p.take()).unwrap_or_else(Gather::new)
}

/// Gives a reset gather back, unless small pieces grew it large.
fn give_gather(g: Gather) {
    if g.small.capacity() <= READ_KEEP_MAX {
        GATHERS.with(|p| p.give(g));
    }
}

/// Vectored writer (plain TCP, payloads sent as they are): one `writev`
/// per wakeup, body buffers sent where they are.
async fn run_vectored<W: AsyncWriteRent>(
    mut io: W,
    mut rx: OutRx,
    masking: Masking,
) -> io::Result<()> {
    debug_assert!(!masking.transforms());
    let mut held: Option<Gather> = None;
    while let Some(first) = next_message(&mut rx, &mut held, give_gather).await {
        let mut g = held.take().unwrap_or_else(take_gather);
        g.masking = masking;
        let mut closing = g.push(first);
        while !closing && !g.full() {
            match rx.try_recv() {
                Ok(m) => closing = g.push(m),
                Err(_) => break,
            }
        }
        g.seal();
        // Our own loop, not `write_vectored_all`: monoio 0.2.4's advances
        // the iovec length but not its base after a partial write.
        loop {
            let (res, back) = io.writev(g).await;
            g = back;
            match res {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    if g.advance(n) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        g.reset();
        held = Some(g);
        if closing {
            break;
        }
    }
    if let Some(g) = held {
        give_gather(g);
    }
    let _ = io.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::Limits;

    #[test]
    fn a_large_frame_grows_the_read_buffer_for_four_of_its_size() {
        // Small frames (or an incomplete header): one chunk more.
        assert_eq!(grow_by(10, 4), READ_CHUNK);
        assert_eq!(grow_by(0, 2), READ_CHUNK);
        // A 65.6 KiB frame, 60 KiB of it read: room for four such frames
        // in all, so the next three are read without a copy.
        let frame = 65_600;
        assert_eq!(60_000 + grow_by(60_000, frame - 60_000), 4 * frame);
        // Its header only: the same.
        assert_eq!(14 + grow_by(14, frame - 14), 4 * frame);
        // Capped, but always room for the frame itself.
        let huge = 4 * 1024 * 1024;
        assert_eq!(grow_by(100, huge - 100), huge - 100);
        assert_eq!(1000 + grow_by(1000, 300_000), READ_BIG_MAX);
    }

    fn messages() -> Vec<(Outgoing, Option<Event>)> {
        let big: Bytes = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut v = Vec::new();
        for i in 0..40u32 {
            let head = BytesMut::from(&format!("HEAD{i}|")[..]);
            let split = head.len() - 1;
            let body = big.slice(i as usize * 1000..i as usize * 1000 + 5000 + i as usize * 3000);
            let mut whole = head[..split].to_vec();
            whole.extend_from_slice(&body);
            whole.extend_from_slice(&head[split..]);
            v.push((
                Outgoing::Parts { head, split, body },
                Some(Event::Binary(whole.into())),
            ));
            let small = BytesMut::from(&format!("small {i}")[..]);
            v.push((
                Outgoing::Binary(small.clone()),
                Some(Event::Binary(small.freeze())),
            ));
            let large = BytesMut::from(&big[..3000 + i as usize]);
            v.push((
                Outgoing::Binary(large.clone()),
                Some(Event::Binary(large.freeze())),
            ));
            v.push((
                Outgoing::Text(format!("{{\"n\":{i}}}").into_bytes()),
                Some(Event::Text(format!("{{\"n\":{i}}}").into())),
            ));
            v.push((
                Outgoing::Ping(Bytes::from_static(b"p")),
                Some(Event::Ping(Bytes::from_static(b"p"))),
            ));
            // A body-less frame: no empty iovec.
            let head = BytesMut::from(&b"HEAD-ONLY"[..]);
            v.push((
                Outgoing::Parts {
                    head: head.clone(),
                    split: 4,
                    body: Bytes::new(),
                },
                Some(Event::Binary(head.freeze())),
            ));
        }
        v
    }

    /// A writer task on one end of a loopback connection (`masking`: the
    /// role it writes in) and a reader of the other role on the other.
    async fn writer_and_reader(
        rx: OutRx,
        masking: Masking,
        vectored: bool,
    ) -> (
        monoio::task::JoinHandle<()>,
        WsReader<monoio::net::TcpStream>,
    ) {
        let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let writer = monoio::spawn(async move {
            let c = monoio::net::TcpStream::connect(addr).await.unwrap();
            run_writer(c, rx, masking, vectored).await.unwrap();
        });
        let (s, _) = l.accept().await.unwrap();
        let peer = match masking {
            Masking::Unmasked => Role::Client,
            Masking::Random | Masking::Zero => Role::Server,
        };
        let limits = Limits {
            max_frame_payload: 1 << 20,
            max_message: 1 << 20,
            max_fragments: 16,
        };
        let r = WsReader::new(s, BytesMut::new(), Decoder::new(peer, limits), None);
        (writer, r)
    }

    /// Every message arrives whole and in order through both writers and
    /// both roles, over a real socket (partial writes included: ~12 MiB
    /// queued before the reader starts).
    #[monoio::test_all(timer_enabled = true)]
    async fn writers_deliver_every_message_in_order() {
        for (masking, vectored) in [
            (Masking::Unmasked, true),
            (Masking::Unmasked, false),
            (Masking::Random, false),
            (Masking::Zero, true),
            (Masking::Zero, false),
        ] {
            let role = match masking {
                Masking::Unmasked => Role::Server,
                _ => Role::Client,
            };
            let (tx, rx) = crate::ws::queue::channel();
            let mut expect = Vec::new();
            for _ in 0..4 {
                for (m, e) in messages() {
                    tx.send(m).unwrap();
                    expect.extend(e);
                }
            }
            drop(tx);
            let (writer, mut r) = writer_and_reader(rx, masking, vectored).await;
            for (i, want) in expect.iter().enumerate() {
                let got = r.next(i % 2 == 0).await.unwrap();
                assert_eq!(
                    format!("{got:?}"),
                    format!("{want:?}"),
                    "message {i} ({role:?}, vectored {vectored})"
                );
            }
            assert!(matches!(r.next(false).await, Err(ConnError::Eof)));
            writer.await;
        }
    }

    /// A small binary frame that a writer copies into its batch goes back
    /// to the frame pool (`pool::frame_heads`), where the encoders take
    /// theirs: a request's frame costs no allocation.
    #[monoio::test_all(timer_enabled = true)]
    async fn copied_frames_go_back_to_the_frame_pool() {
        use crate::pool::frame_heads;
        for vectored in [true, false] {
            while frame_heads::len() > 0 {
                drop(frame_heads::take());
            }
            let (tx, rx) = crate::ws::queue::channel();
            for i in 0..8u8 {
                let mut f = frame_heads::take();
                f.extend_from_slice(&[i; 100]);
                tx.send(Outgoing::Binary(f)).unwrap();
            }
            drop(tx);
            let (writer, mut r) = writer_and_reader(rx, Masking::Unmasked, vectored).await;
            for i in 0..8u8 {
                match r.next(true).await {
                    Ok(Event::Binary(b)) => assert_eq!(&b[..], &[i; 100][..]),
                    other => panic!("frame {i}: {other:?}"),
                }
            }
            writer.await;
            assert_eq!(frame_heads::len(), 8, "vectored {vectored}");
        }
    }

    /// `zeromask`: every frame has the MASK bit and the all-zero key, and
    /// the payload on the wire is the payload (a body large enough to go
    /// out as its own iovec included); with random masking it is not.
    #[monoio::test_all(timer_enabled = true)]
    async fn zero_masking_sends_payloads_as_they_are() {
        use monoio::io::AsyncReadRentExt;
        let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        for (masking, vectored) in [(Masking::Zero, true), (Masking::Random, false)] {
            let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let (tx, rx) = crate::ws::queue::channel();
            tx.send(Outgoing::Binary(BytesMut::from(&body[..])))
                .unwrap();
            drop(tx);
            monoio::spawn(async move {
                let c = monoio::net::TcpStream::connect(addr).await.unwrap();
                run_writer(c, rx, masking, vectored).await.unwrap();
            });
            let (mut s, _) = l.accept().await.unwrap();
            // 2 + 2 (length 126..=65535) + 4 (key) header bytes.
            let (r, wire) = s.read_exact(vec![0u8; 8 + body.len()]).await;
            r.unwrap();
            assert_eq!(wire[1] & 0x80, 0x80, "MASK bit ({masking:?})");
            assert_eq!(u16::from_be_bytes([wire[2], wire[3]]) as usize, body.len());
            let plain = wire[4..8] == [0; 4] && wire[8..] == body[..];
            assert_eq!(plain, masking == Masking::Zero, "{masking:?}");
        }
    }

    /// A run of frames a little over 64 KiB (a 64 KiB response each) is
    /// read four to a buffer: consecutive payloads lie back to back in one
    /// allocation, and a new buffer (with a copy of the frame begun in the
    /// old one) comes once per four frames, not for nearly every frame as
    /// with buffers sized for one (`grow_by`).
    #[monoio::test_all(timer_enabled = true)]
    async fn large_frames_are_read_four_to_a_buffer() {
        let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = crate::ws::queue::channel();
        let writer = monoio::spawn(async move {
            let c = monoio::net::TcpStream::connect(addr).await.unwrap();
            run_writer(c, rx, Masking::Random, false).await.unwrap();
        });
        let (s, _) = l.accept().await.unwrap();
        let limits = Limits {
            max_frame_payload: 1 << 20,
            max_message: 1 << 20,
            max_fragments: 16,
        };
        let mut r = WsReader::new(s, BytesMut::new(), Decoder::new(Role::Server, limits), None);
        const FRAMES: usize = 16;
        const SIZE: usize = 65_600;
        for i in 0..FRAMES {
            tx.send(Outgoing::Binary(BytesMut::from(&vec![i as u8; SIZE][..])))
                .unwrap();
        }
        // Kept, as bodies waiting for a slow client would be.
        let mut got = Vec::new();
        for i in 0..FRAMES {
            match r.next(true).await {
                Ok(Event::Binary(b)) => {
                    assert!(b.len() == SIZE && b.iter().all(|x| *x == i as u8));
                    got.push(b);
                }
                other => panic!("frame {i}: {other:?}"),
            }
        }
        // Back to back: the next payload starts one frame header (14
        // bytes: 64-bit length and masking key) after the previous one ends.
        let buffers = 1 + got
            .windows(2)
            .filter(|w| w[1].as_ptr() as usize != w[0].as_ptr() as usize + SIZE + 14)
            .count();
        assert!(
            buffers <= FRAMES / 4 + 2,
            "{FRAMES} frames of {SIZE} bytes took {buffers} read buffers"
        );
        drop(tx);
        writer.await;
    }

    /// An idle reader holds no buffer: once what it read is decoded and
    /// nothing is in flight, its buffer is back in the pool while it
    /// waits; a busy one keeps it. The next message still arrives whole.
    #[monoio::test_all(timer_enabled = true)]
    async fn idle_reader_gives_its_buffer_back() {
        use std::future::Future;
        use std::task::Poll;
        let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = crate::ws::queue::channel();
        let writer = monoio::spawn(async move {
            let c = monoio::net::TcpStream::connect(addr).await.unwrap();
            run_writer(c, rx, Masking::Random, false).await.unwrap();
        });
        let (s, _) = l.accept().await.unwrap();
        let limits = Limits {
            max_frame_payload: 1 << 20,
            max_message: 1 << 20,
            max_fragments: 16,
        };
        let mut r = WsReader::new(s, BytesMut::new(), Decoder::new(Role::Server, limits), None);
        let pooled = || READS.with(|p| p.len());
        let before = pooled();
        tx.send(Outgoing::Text(b"one".to_vec())).unwrap();
        assert!(matches!(r.next(false).await, Ok(Event::Text(_))));
        assert!(r.holds_buffer(), "a reader that just read holds its buffer");
        // Idle: the wait hands the buffer back before it parks.
        {
            let mut next = std::pin::pin!(r.next(false));
            let first = std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await;
            assert!(first.is_pending(), "nothing was sent");
            assert_eq!(
                pooled(),
                before + 1,
                "the idle reader's buffer is in the pool"
            );
            tx.send(Outgoing::Text(b"two".to_vec())).unwrap();
            let ev = next.await.unwrap();
            assert_eq!(
                format!("{ev:?}"),
                format!("{:?}", Event::Text("two".into()))
            );
        }
        assert_eq!(pooled(), before, "taken again for the read");
        // Busy: the buffer stays with the reader while it waits.
        {
            let mut next = std::pin::pin!(r.next(true));
            let first = std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await;
            assert!(first.is_pending());
            assert_eq!(pooled(), before, "a busy reader keeps its buffer");
            tx.send(Outgoing::Text(b"three".to_vec())).unwrap();
            assert!(matches!(next.await, Ok(Event::Text(_))));
        }
        drop(tx);
        assert!(matches!(r.next(false).await, Err(ConnError::Eof)));
        writer.await;
    }

    /// A writer that went quiet gives its batch back to the pool (after
    /// `BATCH_LINGER`), and takes one again for the next message.
    #[monoio::test_all(timer_enabled = true)]
    async fn quiet_writer_gives_its_batch_back() {
        for vectored in [true, false] {
            let (tx, rx) = crate::ws::queue::channel();
            let (writer, mut r) = writer_and_reader(rx, Masking::Unmasked, vectored).await;
            let pooled = || {
                if vectored {
                    GATHERS.with(|p| p.len())
                } else {
                    BATCHES.with(|p| p.len())
                }
            };
            let before = pooled();
            for i in 0..3 {
                tx.send(Outgoing::Text(format!("m{i}").into_bytes()))
                    .unwrap();
                assert!(matches!(r.next(false).await, Ok(Event::Text(_))));
                // Waits on the condition, with a generous deadline.
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while pooled() != before + 1 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the quiet writer kept its batch (vectored {vectored})"
                    );
                    monoio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            drop(tx);
            assert!(matches!(r.next(false).await, Err(ConnError::Eof)));
            writer.await;
        }
    }
}
