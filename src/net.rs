//! Listening sockets: one per worker on the same address with
//! `SO_REUSEPORT` (socket2), so the kernel spreads connections over cores
//! without a shared accept queue; and the probe that tells whether another
//! process already listens on an address (`port_held`).

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

use socket2::{Domain, Protocol, Socket, Type};

pub fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {host}")))
}

/// A non-blocking listener with `SO_REUSEADDR` and `SO_REUSEPORT`.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Has the kernel abort the connection when what was sent on it stays
/// unacknowledged, or the peer's receive window stays closed, for `d`
/// (`TCP_USER_TIMEOUT`; Linux counts a closed window's probes against it,
/// so a peer that stops reading is cut too). The write waiting on it then
/// fails with ETIMEDOUT, through the usual error path: no timer of ours,
/// and no write future dropped half-way (which a TLS stream does not
/// survive).
pub fn set_send_timeout(s: &impl std::os::fd::AsRawFd, d: std::time::Duration) -> io::Result<()> {
    // SAFETY: `s` owns the descriptor and outlives this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(s.as_raw_fd()) };
    socket2::SockRef::from(&fd).set_tcp_user_timeout(Some(d))
}

/// Whether another socket listens on `addr`: a bind with `SO_REUSEADDR`
/// but without `SO_REUSEPORT` fails with `EADDRINUSE` exactly then
/// (`SO_REUSEADDR` lets it past sockets in TIME_WAIT and connections left
/// by an earlier process; Linux refuses it only next to a listener). The
/// probe socket is closed before this returns; it never listens.
pub fn port_held(addr: SocketAddr) -> io::Result<bool> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    match s.bind(&addr.into()) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(true),
        Err(e) => Err(e),
    }
}

/// `n` listeners on one address; when `addr` has port 0 the first bind
/// picks the port and the others share it. Their group moves what a
/// closing listener holds to the others ([`migrate_on_close`]) where the
/// kernel lets this process say so; the failure is logged, not fatal.
pub fn bind_workers(addr: SocketAddr, n: usize) -> io::Result<(SocketAddr, Vec<TcpListener>)> {
    let first = bind_reuseport(addr)?;
    let actual = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(bind_reuseport(actual)?);
    }
    hand_on_when_closed(&all[0]);
    Ok((actual, all))
}

/// [`migrate_on_close`] for `l`'s group, or a warning that says what a
/// restart then relies on.
/// Warned once per process, not once per port.
pub fn hand_on_when_closed(l: &TcpListener) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Err(e) = migrate_on_close(l) {
        if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let addr = l.local_addr().ok();
        tracing::warn!(?addr, error = %e,
            "listeners cannot hand their queued connections on when they close (needs CAP_BPF); \
             a restart then relies on net.ipv4.tcp_migrate_req = 1 not to reset connections that \
             arrive while the old gateway closes (OPERATIONS.md)");
    }
}

/// Makes `l`'s `SO_REUSEPORT` group hand on what a closing listener holds:
/// connections in its accept queue and handshakes in progress go to
/// another listener of the group instead of being reset. This is what
/// `net.ipv4.tcp_migrate_req = 1` does for the whole host; a group with
/// a `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` program gets it whatever the
/// sysctl says (kernel 5.14+, Documentation/networking/ip-sysctl.rst).
/// The program is two instructions, `return SK_PASS`, selecting nothing,
/// so the kernel keeps choosing a listener by hash as without it, for new
/// connections and for migrated ones. A restart (`manage.sh restart`:
/// the successor joins the group, then the old gateway drains) thus loses
/// no connection that lands in a listener as it closes
/// (`gateway/accept.rs`). Loading it needs `CAP_BPF` (or root).
///
/// Why not a crate (aya, libbpf-rs): for one `bpf(BPF_PROG_LOAD)` of two
/// fixed instructions and one `setsockopt`, a BPF toolchain would be most
/// of the dependency tree (ARCHITECTURE.md, "Deviations").
pub fn migrate_on_close(l: &TcpListener) -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // include/uapi/linux/bpf.h
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
    const BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;
    const SK_PASS: i32 = 1;
    /// `r0 = SK_PASS; exit`: BPF_ALU64 | BPF_MOV | BPF_K, then
    /// BPF_JMP | BPF_EXIT; registers and offsets all 0.
    #[repr(C)]
    struct Insn {
        code: u8,
        regs: u8,
        off: i16,
        imm: i32,
    }
    let prog = [
        Insn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm: SK_PASS,
        },
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    /// The `BPF_PROG_LOAD` part of `union bpf_attr`, zero beyond (the
    /// kernel checks that unused bytes are zero).
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        rest: [u32; 11],
        expected_attach_type: u32,
        tail: [u32; 18],
    }
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SK_REUSEPORT,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        rest: [0; 11],
        expected_attach_type: BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
        tail: [0; 18],
    };
    const _: () = assert!(std::mem::offset_of!(ProgLoad, expected_attach_type) == 68);
    const _: () = assert!(std::mem::size_of::<ProgLoad>() == 144);
    // SAFETY: bpf(2) reads `attr` (sized as passed) and the instruction and
    // license buffers it points to, all alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &mut attr as *mut ProgLoad,
            std::mem::size_of::<ProgLoad>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: bpf returned a new descriptor that nothing else owns. The
    // group keeps the program once attached; ours closes on return.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let raw = prog_fd.as_raw_fd();
    // SAFETY: setsockopt reads one c_int from `raw`.
    let r = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_EBPF,
            &raw as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What a read into a buffer it owns gives back: the outcome and the
/// buffer.
pub type ReadDone = (io::Result<usize>, bytes::BytesMut);

/// A transport that can wait for bytes without lending a buffer: an idle
/// keep-alive connection or an idle tunnel then holds no read buffer
/// (monoio's reads own their buffer until they complete, and a read cannot
/// be dropped without losing what it read).
pub trait Readable {
    /// Waits until the socket has something to read. Transports that
    /// buffer internally (TLS: rustls may already hold decrypted bytes)
    /// return at once, and so keep holding a buffer while idle.
    fn wait_readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> {
        std::future::ready(Ok(()))
    }

    /// Resolves once the peer has closed the connection (or it failed),
    /// looking without reading: while the gateway waits for a response,
    /// a client that left cancels its request. Stays pending once bytes
    /// are waiting (a pipelined request is not a close). Transports that
    /// cannot tell without reading (TLS) never resolve.
    fn closed_by_peer(&self) -> impl std::future::Future<Output = ()> {
        std::future::pending()
    }

    /// Whether each write becomes TLS records of its own (and a send):
    /// then [`Writev::send_packed`] writes what a `writev` would.
    fn writes_records(&self) -> bool {
        false
    }

    /// A read into `buf`'s spare room, as [`read_append`], that a cancel
    /// through `c` stops without losing what it read: it then ends with
    /// those bytes, or with ECANCELED and nothing read. `Err(buf)` where a
    /// read cannot be stopped so (TLS: a cut read leaves the session
    /// unusable); such a transport waits with `wait_readable` instead.
    fn cancelable_read_append(
        &mut self,
        buf: bytes::BytesMut,
        _c: monoio::io::CancelHandle,
    ) -> Result<impl std::future::Future<Output = ReadDone>, bytes::BytesMut> {
        Err::<std::future::Ready<_>, _>(buf)
    }
}

impl Readable for monoio::net::TcpStream {
    fn cancelable_read_append(
        &mut self,
        buf: bytes::BytesMut,
        c: monoio::io::CancelHandle,
    ) -> Result<impl std::future::Future<Output = ReadDone>, bytes::BytesMut> {
        use monoio::buf::IoBufMut;
        use monoio::io::CancelableAsyncReadRent;
        Ok(async move {
            let (len, cap) = (buf.len(), buf.capacity());
            debug_assert!(cap > len, "cancelable_read_append needs spare capacity");
            let (res, slice) = self.cancelable_read(buf.slice_mut(len..cap), c).await;
            (res, slice.into_inner())
        })
    }

    fn wait_readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> {
        // A PollAdd on io_uring, the readiness state on epoll; dropping it
        // consumes nothing.
        self.readable(false)
    }

    async fn closed_by_peer(&self) {
        loop {
            if self.readable(false).await.is_err() {
                return;
            }
            match peek_byte(self) {
                Peek::Closed | Peek::Error => return,
                Peek::Byte(_) => std::future::pending::<()>().await,
                Peek::Empty | Peek::Interrupted => {}
            }
        }
    }
}

/// The read half of a split stream (the tunnel reader) waits like the
/// whole stream.
impl<T: Readable> Readable for monoio::io::OwnedReadHalf<T> {
    fn wait_readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> {
        // SAFETY: the halves share the stream through an `Rc<UnsafeCell>`
        // on one thread, exactly as monoio's own `OwnedReadHalf` methods
        // (`read`, `peer_addr`) reach it; `wait_readable` takes `&self`
        // and touches only the descriptor, never the write half's state.
        unsafe { &*self.0.get() }.wait_readable()
    }
}

/// A client transport whose socket can be handed to another core's runtime
/// (plain TCP can; a TLS session keeps its state on this core).
pub trait Movable: Sized + Readable {
    const MOVABLE: bool;
    fn into_owned_fd(self) -> Result<std::os::fd::OwnedFd, Self>;
}

impl Movable for monoio::net::TcpStream {
    const MOVABLE: bool = true;
    fn into_owned_fd(self) -> Result<std::os::fd::OwnedFd, Self> {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // into_raw_fd deregisters the socket from this runtime and gives up
        // ownership without closing it; it panics only if the stream was
        // split (it is not: the whole stream is ours here).
        let fd = self.into_raw_fd();
        // SAFETY: `fd` is an open socket that nothing else owns any more.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }
}

/// What one non-blocking look at a socket found (`peek_byte`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// A byte is waiting (left queued for the next read).
    Byte(u8),
    /// The peer closed its side.
    Closed,
    /// Nothing yet.
    Empty,
    /// Interrupted by a signal (EINTR): look again.
    Interrupted,
    /// An error (ECONNRESET…).
    Error,
}

/// Looks at the next byte without reading or waiting: `recv(MSG_PEEK |
/// MSG_DONTWAIT)`, one syscall, the same on io_uring and epoll (monoio
/// keeps ordinary descriptors).
pub fn peek_byte(sock: &impl std::os::fd::AsRawFd) -> Peek {
    let mut b = 0u8;
    // SAFETY: recv(2) on the descriptor `sock` owns, open for the call (it
    // is borrowed), into one byte on this stack frame with length 1.
    // MSG_PEEK leaves the byte queued; MSG_DONTWAIT returns at once, so the
    // core never blocks.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        1 => Peek::Byte(b),
        0 => Peek::Closed,
        _ => match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock => Peek::Empty,
            io::ErrorKind::Interrupted => Peek::Interrupted,
            _ => Peek::Error,
        },
    }
}

/// The deadline of [`read_by`] passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// One read appended to `buf` (grown when less than 4 KiB is spare),
/// before `deadline` if there is one: the read's result, or [`Elapsed`].
pub async fn read_by<R: monoio::io::AsyncReadRent>(
    io: &mut R,
    buf: &mut bytes::BytesMut,
    deadline: Option<std::time::Instant>,
) -> Result<io::Result<usize>, Elapsed> {
    room_for_read(buf, 4096, 16 * 1024);
    let b = std::mem::take(buf);
    let (res, b) = match deadline {
        Some(d) => {
            let left = d.saturating_duration_since(std::time::Instant::now());
            monoio::time::timeout(left, read_append(io, b))
                .await
                .map_err(|_| Elapsed)?
        }
        None => read_append(io, b).await,
    };
    *buf = b;
    Ok(res)
}

/// Makes room in `buf` for `additional` more bytes after those it holds,
/// copying at most those bytes. `BytesMut::reserve` on a buffer whose
/// allocation has no other owner left grows it in place with a realloc,
/// which copies everything before the live bytes too (the frames or
/// pieces already split off and sent) and doubles it: a receiver reading
/// 64 KiB responses copied each previous response along (1.2 % of its
/// CPU in `realloc`'s memcpy). Here the room is reclaimed where the
/// buffer lies when it can be (no copy, or the live bytes moved to its
/// front), and otherwise the live bytes go to a new buffer of exactly
/// `len + additional`.
pub fn reserve_live(buf: &mut bytes::BytesMut, additional: usize) {
    if buf.capacity() - buf.len() >= additional || buf.try_reclaim(additional) {
        return;
    }
    let mut fresh = bytes::BytesMut::with_capacity(buf.len() + additional);
    fresh.extend_from_slice(buf);
    *buf = fresh;
}

/// Room for the next read into `buf`, whose spare room ran low: `floor`
/// more at least, and as much again as it holds, up to `cap` more (what
/// is still due, when that is known). For a buffer whose live bytes grow
/// read by read until a whole is there (a body gathered whole), each copy
/// into a new buffer then doubles it, so n bytes cost O(n) copies in all.
/// Room by a fixed step copied everything held on each step: a 64 MiB
/// body gathered by 16 KiB steps moved 128 GiB and took a core for
/// seconds; 1 GiB never ended. A buffer whose pieces are split off as
/// they come (a head, frames) holds little, and gets `floor`.
pub fn reserve_more(buf: &mut bytes::BytesMut, floor: usize, cap: usize) {
    reserve_live(buf, buf.len().max(floor).min(cap.max(floor)));
}

/// Before a read into `buf`: when less than `low` is spare, room as
/// [`reserve_more`] gives it, `floor` at least (every read that appends
/// to what a buffer holds: a body read whole grows by doubling).
pub fn room_for_read(buf: &mut bytes::BytesMut, low: usize, floor: usize) {
    if buf.capacity() - buf.len() < low {
        reserve_more(buf, floor, usize::MAX);
    }
}

/// Reads into the spare capacity of `buf`, after the bytes it holds.
///
/// monoio's `IoBufMut` for `BytesMut` writes at the *start* of the buffer
/// (its `write_ptr` is `as_mut_ptr()`), so reading a non-empty buffer
/// directly would overwrite what is there; a `SliceMut` over `len..cap`
/// appends instead. The caller reserves capacity first.
pub async fn read_append<R: monoio::io::AsyncReadRent>(
    io: &mut R,
    buf: bytes::BytesMut,
) -> (io::Result<usize>, bytes::BytesMut) {
    read_append_upto(io, buf, usize::MAX).await
}

/// [`read_append`], reading `max` bytes at most (`max` > 0).
pub async fn read_append_upto<R: monoio::io::AsyncReadRent>(
    io: &mut R,
    buf: bytes::BytesMut,
    max: usize,
) -> (io::Result<usize>, bytes::BytesMut) {
    use monoio::buf::IoBufMut;
    let len = buf.len();
    let end = buf.capacity().min(len.saturating_add(max));
    debug_assert!(end > len, "read_append needs spare capacity");
    let (res, slice) = io.read(buf.slice_mut(len..end)).await;
    (res, slice.into_inner())
}

/// Bytes for one `writev`, in order: small pieces formatted here (a
/// response head, chunk-size lines, CRLFs: appended to one buffer) and
/// bodies (refcounted, sent where they lie, never copied), so a response
/// or a run of body pieces leaves with one submission instead of one write
/// per piece. [`Writev::send`] resumes short writes from where they
/// stopped (not monoio 0.2.4's `write_vectored_all`, which shrinks a
/// partly written iovec without advancing its base: ARCHITECTURE.md,
/// "Deviations"); on TLS (monoio-rustls's `writev` takes only the first
/// iovec) that is one write per piece, as before. Pooled per thread
/// ([`Writev::take`], [`Writev::give`]): a write allocates nothing in
/// steady state.
#[derive(Default)]
pub struct Writev {
    small: Vec<u8>,
    /// In order: a range of `small`, or a body.
    segs: Vec<Seg>,
    bodies: Vec<bytes::Bytes>,
    /// On the heap: the kernel reads it through a pointer while this value
    /// moves into monoio's op.
    iov: Vec<libc::iovec>,
    /// First iovec not yet fully written.
    at: usize,
    /// Where the current run of small pieces started in `small`.
    run: usize,
    bytes: usize,
    /// The writes of [`Writev::send_packed`], joined here.
    pack: Vec<u8>,
}

enum Seg {
    Small(usize, usize),
    Body(usize),
}

/// A body up to this size is copied behind what goes before it rather
/// than given an iovec of its own ([`write_joined`]).
pub const COALESCE_BODY: usize = 16 * 1024;

/// Writes `head`, `body` and `tail` with one write: a body up to
/// [`COALESCE_BODY`] copied between them, a larger one uncopied in one
/// `writev` ([`Writev`]). `head` comes back as it was, capacity kept (a
/// caller may send it again: the receiver's retry on a fresh connection).
/// A response to a client, a request to an app: either way the peer gets
/// it whole at once, which matters to an app that answers on the head.
pub async fn write_joined<W: monoio::io::AsyncWriteRent>(
    io: &mut W,
    head: &mut Vec<u8>,
    body: bytes::Bytes,
    tail: &'static [u8],
) -> io::Result<()> {
    use monoio::io::AsyncWriteRentExt;
    let len = head.len();
    if body.len() <= COALESCE_BODY {
        head.extend_from_slice(&body);
        head.extend_from_slice(tail);
        let (res, mut h) = io.write_all(std::mem::take(head)).await;
        h.truncate(len);
        *head = h;
        return res.map(|_| ());
    }
    let mut w = Writev::take();
    w.small().extend_from_slice(head);
    w.body(body);
    w.small().extend_from_slice(tail);
    let (res, w) = w.send(io).await;
    Writev::give(w);
    res
}

/// Most iovecs one `Writev` gathers (IOV_MAX is 1024 on Linux).
const WRITEV_IOV_MAX: usize = 256;
/// A `Writev` whose small buffer grew past this is not pooled.
const WRITEV_KEEP_MAX: usize = 64 * 1024;

thread_local! {
    static WRITEVS: crate::pool::FreeList<Writev> = const { crate::pool::FreeList::new(256) };
}

// SAFETY: the iovecs point into `small` and `bodies`, which are not
// touched (no push, no reallocation) between `seal` and the end of the
// write that owns this value (a `Vec`'s and a `Bytes`' heap storage does
// not move when the value does); the iovec array is on the heap too.
unsafe impl monoio::buf::IoVecBuf for Writev {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov[self.at..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iov.len() - self.at
    }
}

impl Writev {
    /// An empty one from this thread's pool.
    pub fn take() -> Writev {
        WRITEVS.with(|l| l.take()).unwrap_or_default()
    }

    /// Back to the pool (emptied), unless it grew large.
    pub fn give(mut w: Writev) {
        w.clear();
        if w.small.capacity() <= WRITEV_KEEP_MAX {
            WRITEVS.with(|l| l.give(w));
        }
    }

    /// The small-pieces buffer: what is appended goes out after what was
    /// added before (a body included).
    pub fn small(&mut self) -> &mut Vec<u8> {
        &mut self.small
    }

    /// A body, sent as it is after what was added before.
    pub fn body(&mut self, b: bytes::Bytes) {
        if b.is_empty() {
            return;
        }
        self.close_run();
        self.bytes += b.len();
        self.segs.push(Seg::Body(self.bodies.len()));
        self.bodies.push(b);
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes + self.small.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// No more bodies fit in one `writev`.
    pub fn full(&self) -> bool {
        self.segs.len() + 2 >= WRITEV_IOV_MAX
    }

    /// Everything held, with as few `writev`s as the socket allows; then
    /// emptied (capacity kept) whether or not the write succeeded.
    pub async fn send<W: monoio::io::AsyncWriteRent>(self, io: &mut W) -> (io::Result<()>, Self) {
        let mut w = self;
        w.seal();
        let res = loop {
            if w.at == w.iov.len() {
                break Ok(());
            }
            let (res, back) = io.writev(w).await;
            w = back;
            match res {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => w.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        w.clear();
        (res, w)
    }

    /// [`Writev::send`] for a stream that turns every write into TLS
    /// records of its own and a send (monoio-rustls, whose `writev` takes
    /// only the first iovec): the pieces go in whole records of `pack`
    /// bytes (one record's plaintext) but the last, the small ones joined
    /// with each other and with the start of the body after them, so a
    /// response head or a chunk line shares a record with body bytes
    /// instead of making a record and a TCP segment alone. Whole records
    /// of a body go uncopied (TLS copies them into its records anyway).
    pub async fn send_packed<W: monoio::io::AsyncWriteRent>(
        self,
        io: &mut W,
        pack: usize,
    ) -> (io::Result<()>, Self) {
        use monoio::io::AsyncWriteRentExt;
        let mut w = self;
        w.close_run();
        let mut buf = std::mem::take(&mut w.pack);
        buf.clear();
        let mut res = Ok(());
        'segs: for k in 0..w.segs.len() {
            let (body, end) = match w.segs[k] {
                Seg::Small(a, b) => (None, (a, b)),
                Seg::Body(i) => (Some(w.bodies[i].clone()), (0, w.bodies[i].len())),
            };
            let (mut at, end) = end;
            while at < end {
                if let Some(b) = body.as_ref().filter(|_| buf.is_empty() && end - at >= pack) {
                    // Whole records only, at most four per write (rustls
                    // takes 64 KiB of plaintext at a time: more would end
                    // each write with a small record).
                    let n = ((end - at) / pack).min(4) * pack;
                    let (r, _) = io.write_all(b.slice(at..at + n)).await;
                    if let Err(e) = r {
                        res = Err(e);
                        break 'segs;
                    }
                    at += n;
                    continue;
                }
                let take = (pack - buf.len()).min(end - at);
                match &body {
                    Some(b) => buf.extend_from_slice(&b[at..at + take]),
                    None => buf.extend_from_slice(&w.small[at..at + take]),
                }
                at += take;
                if buf.len() == pack {
                    let (r, b) = io.write_all(buf).await;
                    buf = b;
                    buf.clear();
                    if let Err(e) = r {
                        res = Err(e);
                        break 'segs;
                    }
                }
            }
        }
        if res.is_ok() && !buf.is_empty() {
            let (r, b) = io.write_all(buf).await;
            buf = b;
            res = r.map(|_| ());
        }
        buf.clear();
        w.pack = buf;
        w.clear();
        (res, w)
    }

    /// The small pieces added last made a segment of their own.
    fn close_run(&mut self) {
        if self.small.len() > self.run {
            self.segs.push(Seg::Small(self.run, self.small.len()));
            self.run = self.small.len();
        }
    }

    /// The segments as iovecs, for `writev`.
    fn seal(&mut self) {
        self.close_run();
        self.iov.clear();
        self.at = 0;
        for s in &self.segs {
            let p: &[u8] = match *s {
                Seg::Small(a, b) => &self.small[a..b],
                Seg::Body(i) => &self.bodies[i],
            };
            self.iov.push(libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            });
        }
    }

    /// Marks `n` more bytes written.
    fn advance(&mut self, mut n: usize) {
        while let Some(v) = self.iov.get_mut(self.at) {
            if n < v.iov_len {
                // SAFETY: n < iov_len: the new base stays inside the piece.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                return;
            }
            n -= v.iov_len;
            self.at += 1;
        }
    }

    fn clear(&mut self) {
        self.small.clear();
        self.segs.clear();
        self.bodies.clear();
        self.iov.clear();
        self.at = 0;
        self.run = 0;
        self.bytes = 0;
    }
}

/// Implements monoio's `AsyncReadRent` and `AsyncWriteRent` for an enum of
/// streams by delegating to the stream in each variant (its first field):
/// the one shape for every "plain, TLS or …" connection type.
macro_rules! delegate_rent_io {
    ($ty:ident { $($var:ident),+ $(,)? }) => {
        impl monoio::io::AsyncReadRent for $ty {
            async fn read<T: monoio::buf::IoBufMut>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
                match self { $( $ty::$var(s, ..) => s.read(buf).await, )+ }
            }

            async fn readv<T: monoio::buf::IoVecBufMut>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
                match self { $( $ty::$var(s, ..) => s.readv(buf).await, )+ }
            }
        }

        impl monoio::io::AsyncWriteRent for $ty {
            async fn write<T: monoio::buf::IoBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
                match self { $( $ty::$var(s, ..) => s.write(buf).await, )+ }
            }

            async fn writev<T: monoio::buf::IoVecBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
                match self { $( $ty::$var(s, ..) => s.writev(buf).await, )+ }
            }

            async fn flush(&mut self) -> std::io::Result<()> {
                match self { $( $ty::$var(s, ..) => s.flush().await, )+ }
            }

            async fn shutdown(&mut self) -> std::io::Result<()> {
                match self { $( $ty::$var(s, ..) => s.shutdown().await, )+ }
            }
        }
    };
}
pub(crate) use delegate_rent_io;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Room for the next read of a buffer whose earlier pieces were split
    /// off and dropped: what it holds is kept, and only that is copied. A
    /// 64 KiB piece already sent is not carried along (with
    /// `BytesMut::reserve` the buffer grew in place to twice its size,
    /// the sent bytes copied with it).
    #[test]
    fn room_for_a_read_copies_only_the_bytes_still_held() {
        use bytes::BytesMut;
        let mut buf = BytesMut::with_capacity(72 * 1024);
        buf.extend_from_slice(&[7u8; 70 * 1024]);
        drop(buf.split_to(64 * 1024).freeze()); // sent and dropped
        let held = buf.to_vec();
        reserve_live(&mut buf, 72 * 1024);
        assert_eq!(&buf[..], &held[..], "the bytes held are kept");
        assert_eq!(
            buf.capacity(),
            held.len() + 72 * 1024,
            "a new buffer of what is held plus the room, not the old one grown"
        );
        // Room that fits once the sent part is reclaimed: the same
        // allocation, the held bytes moved to its front.
        let mut buf = BytesMut::with_capacity(72 * 1024);
        buf.extend_from_slice(&[1u8; 66 * 1024]);
        let start = buf.as_ptr();
        drop(buf.split_to(64 * 1024).freeze());
        reserve_live(&mut buf, 32 * 1024);
        assert_eq!(buf.as_ptr(), start, "reclaimed in place");
        assert_eq!(&buf[..], &[1u8; 2 * 1024][..]);
        assert!(buf.capacity() - buf.len() >= 32 * 1024);
        // A piece still in flight (not dropped): the held bytes move to a
        // new buffer, the piece stays intact.
        let mut buf = BytesMut::with_capacity(16 * 1024);
        buf.extend_from_slice(b"0123456789");
        let piece = buf.split_to(4).freeze();
        reserve_live(&mut buf, 64 * 1024);
        assert_eq!(&buf[..], b"456789");
        assert_eq!(&piece[..], b"0123");
        assert!(buf.capacity() - buf.len() >= 64 * 1024);
    }

    /// A buffer that gathers 64 MiB through `read_by`'s reads copies
    /// each byte about once (each new buffer doubles it): with a fixed
    /// 16 KiB step the same body was copied 4,096 times over, 128 GiB in
    /// all. One that holds little gets 16 KiB, as before.
    #[test]
    fn a_buffer_that_gathers_doubles_so_its_copies_stay_linear() {
        let room = |b: &mut bytes::BytesMut| room_for_read(b, 4096, 16 * 1024);
        let (copied, grown, _) = gather(64 << 20, room);
        assert!(copied <= 64 << 20, "{copied} bytes copied to gather 64 MiB");
        assert!(grown <= 13, "{grown} new buffers to gather 64 MiB");
        let mut buf = bytes::BytesMut::from(&b"GET / HT"[..]);
        room(&mut buf);
        assert_eq!(buf.capacity(), 8 + 16 * 1024);
    }

    /// Gathers `whole` bytes into a buffer, `room` called before each
    /// read (a read fills what is spare): bytes copied into new buffers,
    /// how many there were, and the last one's capacity.
    pub(crate) fn gather(
        whole: usize,
        mut room: impl FnMut(&mut bytes::BytesMut),
    ) -> (usize, usize, usize) {
        let mut buf = bytes::BytesMut::new();
        let (mut copied, mut grown) = (0, 0);
        while buf.len() < whole {
            let (at, held) = (buf.as_ptr(), buf.len());
            room(&mut buf);
            if buf.as_ptr() != at {
                copied += held;
                grown += 1;
            }
            let n = (buf.capacity() - buf.len()).min(whole - buf.len());
            buf.resize(buf.len() + n, 0);
        }
        (copied, grown, buf.capacity())
    }

    /// Connections queued in a listener that closes are accepted by the
    /// other listener of its group, not reset (what a restart needs: the
    /// old gateway's listeners close while clients keep connecting). As
    /// root (CI) the program must load; without privilege the refusal must
    /// be EPERM, the documented fallback.
    #[test]
    fn a_closing_listener_hands_its_queued_connections_on() {
        use std::io::{Read, Write};
        let (addr, mut ls) = bind_workers("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        // bind_workers attached the program; attaching again reports.
        if let Err(e) = migrate_on_close(&ls[0]) {
            // SAFETY: geteuid has no preconditions.
            assert_ne!(unsafe { libc::geteuid() }, 0, "root must load it: {e}");
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
            return;
        }
        // 64 handshakes complete into the two queues (hashed: both get
        // some unless 2^-63 luck); nothing is accepted yet.
        let clients: Vec<std::net::TcpStream> = (0..64)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let survivor = ls.pop().unwrap();
        drop(ls);
        // Every connection is now in the survivor's queue.
        let mut accepted = Vec::new();
        while let Ok((s, _)) = survivor.accept() {
            accepted.push(s);
        }
        assert_eq!(
            accepted.len(),
            clients.len(),
            "connections were lost with the closed listener"
        );
        for s in &mut accepted {
            s.write_all(b"k").unwrap();
        }
        for mut c in clients {
            c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b)
                .expect("a handed-on connection is alive");
            assert_eq!(&b, b"k");
        }
    }

    #[test]
    fn port_held_sees_a_listener_and_only_a_listener() {
        let l = bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        assert!(port_held(addr).unwrap(), "a listener holds its port");
        // A second reuseport listener may still join: the probe is what
        // tells a takeover from an accident.
        let joined = bind_reuseport(addr).unwrap();
        drop((l, joined));
        assert!(!port_held(addr).unwrap(), "nobody listens any more");
    }

    /// The gateway's keep-alive read (`gateway/conn.rs::hot_wait`) is
    /// cancelled once its client has been quiet for a while, and a request
    /// may arrive just then. A cancel must never lose bytes: either the
    /// read gives them back, or it ends ECANCELED and they are still in
    /// the socket. Both on io_uring and on the epoll driver.
    #[monoio::test_all(timer_enabled = true)]
    async fn a_cancelled_read_keeps_what_it_read() {
        use std::future::Future;
        use std::io::Write;
        use std::task::Poll;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut s = monoio::net::TcpStream::connect(addr).await.unwrap();
        let (mut peer, _) = l.accept().unwrap();
        let room = |b: bytes::BytesMut| {
            let mut b = b;
            b.reserve(4096);
            b
        };

        // Quiet socket: the cancel ends the read with nothing, buffer back.
        let c = monoio::io::Canceller::new();
        let mut buf = bytes::BytesMut::new();
        buf.extend_from_slice(b"kept");
        let (res, buf) = {
            let mut read = std::pin::pin!(s
                .cancelable_read_append(room(buf), c.handle())
                .ok()
                .unwrap());
            let pending =
                std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx).is_pending()));
            assert!(pending.await, "nothing to read yet");
            drop(c.cancel());
            read.await
        };
        assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::ECANCELED));
        assert_eq!(&buf[..], b"kept", "the buffer comes back as it was");

        // Bytes arrive while the read is posted, then the cancel comes.
        let c = monoio::io::Canceller::new();
        let (res, buf) = {
            let mut read = std::pin::pin!(s
                .cancelable_read_append(room(buf), c.handle())
                .ok()
                .unwrap());
            let pending =
                std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx).is_pending()));
            assert!(pending.await, "nothing to read yet");
            peer.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            // Gives the kernel time to complete the read before the cancel
            // (the case a read dropped on cancel would lose); what is
            // asserted holds whichever comes first.
            monoio::time::sleep(std::time::Duration::from_millis(20)).await;
            drop(c.cancel());
            read.await
        };
        let mut got = buf[4..].to_vec();
        match res {
            Ok(n) => assert_eq!(n, got.len()),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ECANCELED));
                assert!(got.is_empty(), "a cancelled read returns nothing");
                // Then the bytes are still in the socket.
                use monoio::io::AsyncReadRent;
                let read = s.read(vec![0u8; 64]);
                let (r, rest) = monoio::time::timeout(std::time::Duration::from_secs(5), read)
                    .await
                    .expect("the request's bytes: neither in the read nor in the socket");
                got.extend_from_slice(&rest[..r.unwrap()]);
            }
        }
        assert_eq!(&got[..], b"GET / HTTP/1.1\r\n\r\n");
    }

    /// A stream that keeps its writes apart, as TLS makes each write
    /// records of its own.
    struct Records(Vec<Vec<u8>>);

    impl monoio::io::AsyncWriteRent for Records {
        async fn write<T: monoio::buf::IoBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
            // SAFETY: an IoBuf's first `bytes_init` bytes are initialised.
            let s = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
            self.0.push(s.to_vec());
            (Ok(s.len()), buf)
        }
        async fn writev<T: monoio::buf::IoVecBuf>(&mut self, _: T) -> monoio::BufResult<usize, T> {
            unreachable!("TLS streams take one buffer at a time")
        }
        async fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        async fn shutdown(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// On a TLS stream a response's pieces go in as few records as their
    /// bytes fill: the head and the chunk lines share records with body
    /// bytes, and only the last record is not full. One write per piece
    /// (what `send` does there) made a record of each head, chunk line
    /// and CRLF.
    #[monoio::test_all(timer_enabled = true)]
    async fn packed_writes_fill_whole_records() {
        let pack = 1000;
        let body: bytes::Bytes = (0..65_536u32).map(|i| (i % 251) as u8).collect();
        // A head, a large body, a tail; then a run of chunk lines and small
        // and middling bodies (an event stream's pieces).
        let mut w = Writev::take();
        w.small().extend_from_slice(&[b'h'; 200]);
        w.body(body.clone());
        w.small().extend_from_slice(b"\r\n0\r\n\r\n");
        for i in 0..40 {
            w.small().extend_from_slice(b"1f4\r\n");
            w.body(body.slice(i * 500..i * 500 + 500 + (i % 3) * 700));
            w.small().extend_from_slice(b"\r\n");
        }
        let mut want = Vec::new();
        want.extend_from_slice(&[b'h'; 200]);
        want.extend_from_slice(&body);
        want.extend_from_slice(b"\r\n0\r\n\r\n");
        for i in 0..40 {
            want.extend_from_slice(b"1f4\r\n");
            want.extend_from_slice(&body[i * 500..i * 500 + 500 + (i % 3) * 700]);
            want.extend_from_slice(b"\r\n");
        }
        let mut io = Records(Vec::new());
        let (r, w) = w.send_packed(&mut io, pack).await;
        r.unwrap();
        assert!(w.is_empty(), "emptied after the write");
        Writev::give(w);
        assert!(io.0.concat() == want, "bytes differ or out of order");
        let (last, whole) = io.0.split_last().unwrap();
        assert!(
            whole.iter().all(|x| x.len() % pack == 0) && last.len() <= pack,
            "writes of {:?}",
            io.0.iter().map(Vec::len).collect::<Vec<_>>()
        );
        let records: usize = io.0.iter().map(|x| x.len().div_ceil(pack)).sum();
        assert_eq!(records, want.len().div_ceil(pack));
        // The large body's whole records went uncopied, four at most per
        // write (rustls takes 64 KiB of plaintext at a time).
        assert!(io.0.iter().any(|x| x.len() == 4 * pack));
    }

    /// Far more than a loopback socket buffer holds, read slowly: the
    /// `writev`s come back short, some in the middle of an iovec.
    #[monoio::test_all(timer_enabled = true)]
    async fn writev_resumes_short_writes_in_order() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let body: bytes::Bytes = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut want = b"HEAD ".to_vec();
        want.extend_from_slice(&body);
        want.extend_from_slice(b"\r\n0\r\n\r\n");
        let total = want.len();
        // Reads exactly what is expected: the close of a monoio socket is
        // only submitted once the runtime runs again, after the join.
        let reader = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 1000];
            while got.len() < total {
                match s.read(&mut chunk).unwrap() {
                    0 => break,
                    n => got.extend_from_slice(&chunk[..n]),
                }
            }
            got
        });
        let mut s = monoio::net::TcpStream::connect(addr).await.unwrap();
        let mut w = Writev::take();
        w.small().extend_from_slice(b"HEAD ");
        w.body(body.slice(..3 << 20));
        w.body(bytes::Bytes::new()); // skipped: no empty iovec
        w.body(body.slice(3 << 20..));
        w.small().extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(w.len(), want.len());
        let (r, mut w) = w.send(&mut s).await;
        r.unwrap();
        assert!(w.is_empty(), "emptied after the write");
        // Nothing held: no write at all.
        let (r, w2) = w.send(&mut s).await;
        r.unwrap();
        w = w2;
        Writev::give(w);
        drop(s);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes differ");
    }

    #[monoio::test_all(timer_enabled = true)]
    async fn read_append_keeps_what_the_buffer_held() {
        use monoio::io::AsyncWriteRentExt;
        let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = local_sync::oneshot::channel::<()>();
        monoio::spawn(async move {
            let mut c = monoio::net::TcpStream::connect(addr).await.unwrap();
            let (r, _) = c.write_all(b"hello ".to_vec()).await;
            r.unwrap();
            let _ = rx.await;
            let (r, _) = c.write_all(b"world".to_vec()).await;
            r.unwrap();
        });
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = bytes::BytesMut::with_capacity(64);
        while buf.len() < 6 {
            let (r, b) = read_append(&mut s, buf).await;
            r.unwrap();
            buf = b;
        }
        tx.send(()).unwrap();
        while buf.len() < 11 {
            let (r, b) = read_append(&mut s, buf).await;
            assert!(r.unwrap() > 0);
            buf = b;
        }
        assert_eq!(&buf[..], b"hello world");
    }
}
