//! The `stream` extension (PROTOCOL.md §7), sans-IO: a message is sent as
//! it is produced — chunk 0 carries the meta (and the first body bytes),
//! later chunks carry body bytes, the last has `final_chunk = 1`, and no
//! frame carries `chunk_tot`. A message that is complete when its head is
//! sent still goes as one unchunked frame.
//!
//! Flow control rides on WebSocket text control messages (§6 lets a peer
//! ignore them; they are only sent to a peer that negotiated `stream`):
//! `{"type":"credit","request_id":"…","bytes":N}` returns N bytes of
//! window for that request's body to its sender. Each side starts with
//! [`DEFAULT_WINDOW`] bytes per request and direction, so a slow consumer
//! costs at most one window of memory and never stalls other requests.

use bytes::{Bytes, BytesMut};

use super::anpx::{self, BodyCrc, ChunkInfo, DecodeError, FrameType, MetaRef};
pub use super::request_id::RequestId;

/// Body bytes a sender may have in flight per request before credit.
pub const DEFAULT_WINDOW: usize = 256 * 1024;

/// Room for the frame header and TLV heads around a body piece.
const FRAME_OVERHEAD: usize = 128;

/// Body bytes that fit in one frame of `chunk_size` after `meta_len` bytes
/// of meta (at least 1 KiB, so a huge meta still lets the body move).
pub fn piece_size(chunk_size: usize, request_id: &str, meta_len: usize) -> usize {
    chunk_size
        .saturating_sub(FRAME_OVERHEAD + request_id.len() + meta_len)
        .max(1024)
}

/// Writes the frames of one streamed message, in order.
#[derive(Debug)]
pub struct StreamEncoder {
    ty: FrameType,
    next_idx: u32,
    crc: BodyCrc,
}

impl StreamEncoder {
    pub fn new(ty: FrameType) -> Self {
        Self::with_crc(ty, BodyCrc::Computed)
    }

    /// Frames with `body_crc` computed or left 0 (`nocrc`, PROTOCOL.md
    /// §7.9: [`crate::protocol::features::Features::body_crc`]).
    pub fn with_crc(ty: FrameType, crc: BodyCrc) -> Self {
        Self {
            ty,
            next_idx: 0,
            crc,
        }
    }

    /// Chunk 0: the meta and the first body bytes.
    pub fn head(
        &mut self,
        request_id: &str,
        meta: MetaRef<'_>,
        body: &[u8],
        last: bool,
    ) -> BytesMut {
        debug_assert_eq!(self.next_idx, 0);
        self.frame(request_id, Some(meta), body, last)
    }

    /// The next chunk of body bytes.
    pub fn body(&mut self, request_id: &str, body: &[u8], last: bool) -> BytesMut {
        self.frame(request_id, None, body, last)
    }

    /// Chunk 0 with its body as a separate buffer (no copy): the frame is
    /// `head[..split] ++ body ++ head[split..]`; returns `(head, split)`.
    pub fn head_parts(
        &mut self,
        request_id: &str,
        meta: MetaRef<'_>,
        body: &[u8],
        last: bool,
    ) -> (BytesMut, usize) {
        debug_assert_eq!(self.next_idx, 0);
        self.frame_parts(request_id, Some(meta), body, last)
    }

    /// The next chunk, its body as a separate buffer (see [`Self::head_parts`]).
    pub fn body_parts(&mut self, request_id: &str, body: &[u8], last: bool) -> (BytesMut, usize) {
        self.frame_parts(request_id, None, body, last)
    }

    fn frame_parts(
        &mut self,
        request_id: &str,
        meta: Option<MetaRef<'_>>,
        body: &[u8],
        last: bool,
    ) -> (BytesMut, usize) {
        let chunk = ChunkInfo {
            idx: self.next_idx,
            tot: None,
            final_chunk: last,
        };
        self.next_idx += 1;
        let mut head = crate::pool::frame_heads::take();
        let split = anpx::encode_frame_split(
            self.ty,
            request_id,
            meta,
            body,
            Some(chunk),
            self.crc,
            &mut head,
        );
        (head, split)
    }

    fn frame(
        &mut self,
        request_id: &str,
        meta: Option<MetaRef<'_>>,
        body: &[u8],
        last: bool,
    ) -> BytesMut {
        let chunk = ChunkInfo {
            idx: self.next_idx,
            tot: None,
            final_chunk: last,
        };
        self.next_idx += 1;
        let mut out =
            BytesMut::with_capacity(anpx::frame_len(request_id, meta, body.len(), Some(chunk)));
        anpx::encode_frame_with(
            self.ty,
            request_id,
            meta,
            body,
            Some(chunk),
            self.crc,
            &mut out,
        );
        out
    }
}

/// What one frame means to a streaming consumer.
#[derive(Debug)]
pub enum Incoming {
    /// An unchunked message: meta and whole body.
    Whole {
        request_id: RequestId,
        meta: Bytes,
        body: Bytes,
    },
    /// Chunk 0 of a streamed message.
    Start {
        request_id: RequestId,
        meta: Bytes,
        body: Bytes,
        last: bool,
    },
    /// A later chunk.
    More {
        request_id: RequestId,
        idx: u32,
        body: Bytes,
        last: bool,
    },
    /// An error frame (under `cancel`, from the gateway: client went away).
    Error {
        request_id: RequestId,
        message: String,
    },
}

impl Incoming {
    /// The `request_id` the frame names.
    pub fn request_id(&self) -> &str {
        match self {
            Incoming::Whole { request_id, .. }
            | Incoming::Start { request_id, .. }
            | Incoming::More { request_id, .. }
            | Incoming::Error { request_id, .. } => request_id,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("frame without request_id")]
    MissingRequestId,
    #[error("chunk 0 of request {0} carries no meta")]
    MissingMeta(String),
    #[error("frame of type {0:?} where {1:?} was expected")]
    WrongType(FrameType, FrameType),
}

/// Classifies one WebSocket binary message of a `stream` peer. Body and
/// meta are zero-copy slices of `msg`. `crc`: whether a zero `body_crc`
/// is taken as "not computed" (`nocrc`).
pub fn classify(msg: &Bytes, expect: FrameType, crc: BodyCrc) -> Result<Incoming, StreamError> {
    let f = anpx::decode_frame_with(msg, crc)?;
    // Inline (no allocation) for ids of up to 24 bytes, as ours are.
    let request_id = RequestId::from(f.request_id.ok_or(StreamError::MissingRequestId)?);
    let slice = |s: Option<&[u8]>| s.map(|s| msg.slice_ref(s)).unwrap_or_default();
    if f.ty == FrameType::Error {
        let message = String::from_utf8_lossy(f.body.unwrap_or_default()).into_owned();
        return Ok(Incoming::Error {
            request_id,
            message,
        });
    }
    if f.ty != expect {
        return Err(StreamError::WrongType(f.ty, expect));
    }
    let meta = match expect {
        FrameType::Request => f.http_meta,
        _ => f.resp_meta,
    };
    let body = slice(f.body);
    if !f.chunked {
        let meta = meta.ok_or_else(|| StreamError::MissingMeta(request_id.to_string()))?;
        return Ok(Incoming::Whole {
            request_id,
            meta: msg.slice_ref(meta),
            body,
        });
    }
    let idx = f.chunk_idx.unwrap_or(0);
    if idx == 0 {
        let meta = meta.ok_or_else(|| StreamError::MissingMeta(request_id.to_string()))?;
        return Ok(Incoming::Start {
            request_id,
            meta: msg.slice_ref(meta),
            body,
            last: f.final_chunk,
        });
    }
    Ok(Incoming::More {
        request_id,
        idx,
        body,
        last: f.final_chunk,
    })
}

/// A credit control message (WebSocket text; parsed by
/// [`super::control::parse`]).
pub fn credit_message(request_id: &str, bytes: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(64 + request_id.len());
    v.extend_from_slice(b"{\"type\":\"credit\",\"request_id\":");
    v.extend_from_slice(
        serde_json::to_string(request_id)
            .unwrap_or_default()
            .as_bytes(),
    );
    v.extend_from_slice(b",\"bytes\":");
    v.extend_from_slice(bytes.to_string().as_bytes());
    v.push(b'}');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_frames_classify_in_order() {
        let mut enc = StreamEncoder::new(FrameType::Response);
        let f0 = enc.head("r1", MetaRef::Response(b"{\"status\":200}"), b"ab", false);
        let f1 = enc.body("r1", b"cd", false);
        let f2 = enc.body("r1", b"", true);
        match classify(&f0.freeze(), FrameType::Response, BodyCrc::Computed).unwrap() {
            Incoming::Start {
                request_id,
                meta,
                body,
                last,
            } => {
                assert_eq!(
                    (request_id.as_str(), &meta[..], &body[..], last),
                    ("r1", &b"{\"status\":200}"[..], &b"ab"[..], false)
                );
            }
            other => panic!("{other:?}"),
        }
        match classify(&f1.freeze(), FrameType::Response, BodyCrc::Computed).unwrap() {
            Incoming::More {
                idx, body, last, ..
            } => assert_eq!((idx, &body[..], last), (1, &b"cd"[..], false)),
            other => panic!("{other:?}"),
        }
        match classify(&f2.freeze(), FrameType::Response, BodyCrc::Computed).unwrap() {
            Incoming::More {
                idx, body, last, ..
            } => assert_eq!((idx, body.len(), last), (2, 0, true)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn streamed_frames_never_carry_chunk_tot_and_decode_as_v1() {
        let mut enc = StreamEncoder::new(FrameType::Request);
        let meta = br#"{"method":"GET","path":"/a","headers":{},"query":{}}"#;
        let f0 = enc.head("x", MetaRef::Request(meta), b"12", false).freeze();
        let f1 = enc.body("x", b"34", true).freeze();
        let d = anpx::decode_frame(&f0).unwrap();
        assert!(d.chunked && d.chunk_tot.is_none() && !d.final_chunk);
        // A plain reassembler reads a streamed message too.
        let mut r = anpx::Reassembler::new(anpx::Limits {
            max_message_size: 1 << 20,
            max_assemblies: 4,
        });
        assert!(r.push(f0).unwrap().is_none());
        match r.push(f1).unwrap() {
            Some(anpx::Message::Request { meta, body, .. }) => {
                assert_eq!((meta.path.as_str(), &body[..]), ("/a", &b"1234"[..]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_type_and_missing_meta_are_refused() {
        let mut enc = StreamEncoder::new(FrameType::Request);
        let f = enc.head("x", MetaRef::Request(b"{}"), b"", true).freeze();
        assert!(matches!(
            classify(&f, FrameType::Response, BodyCrc::Computed),
            Err(StreamError::WrongType(..))
        ));
        let mut out = BytesMut::new();
        anpx::encode_frame(
            FrameType::Response,
            "y",
            None,
            b"z",
            Some(ChunkInfo {
                idx: 0,
                tot: None,
                final_chunk: false,
            }),
            &mut out,
        );
        assert!(matches!(
            classify(&out.freeze(), FrameType::Response, BodyCrc::Computed),
            Err(StreamError::MissingMeta(_))
        ));
    }

    #[test]
    fn piece_size_leaves_room_for_meta() {
        let p = piece_size(65536, "0123456789abcdef", 500);
        let f = anpx::frame_len(
            "0123456789abcdef",
            Some(MetaRef::Request(&[b'x'; 500])),
            p,
            Some(ChunkInfo {
                idx: 0,
                tot: None,
                final_chunk: true,
            }),
        );
        assert!(f <= 65536, "{f}");
    }
}

/// A per-request credit window: bytes a sender may still send. One sender
/// waits on it at a time. (A counter and a waker, cancel-safe: see
/// `crate::sync` for why no `local_sync` semaphore is used; the waker is
/// taken out of its cell before it is woken.)
///
/// It also carries the request's cancel latch ([`Window::cancel`],
/// [`Window::cancelled`]): the receiver's request task stops when its
/// entry leaves the tunnel's table, and the window is what the two share
/// already (a oneshot for it cost an allocation per request).
#[derive(Debug)]
pub struct Window {
    avail: std::cell::Cell<usize>,
    closed: std::cell::Cell<bool>,
    waker: std::cell::RefCell<Option<std::task::Waker>>,
    cancelled: std::cell::Cell<bool>,
    cancel_waker: std::cell::RefCell<Option<std::task::Waker>>,
}

/// [`Window::cancelled`].
pub struct Cancelled<'a> {
    window: &'a Window,
}

impl std::future::Future for Cancelled<'_> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.window.cancelled.get() {
            return std::task::Poll::Ready(());
        }
        let old = self.window.cancel_waker.replace(Some(cx.waker().clone()));
        // Dropped with no borrow held (crate::sync).
        drop(old);
        std::task::Poll::Pending
    }
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        let w = self.window.cancel_waker.take();
        drop(w);
    }
}

/// The window was closed: the request or its tunnel is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowClosed;

impl Window {
    pub fn new(bytes: usize) -> Self {
        Self {
            avail: std::cell::Cell::new(bytes),
            closed: std::cell::Cell::new(false),
            waker: std::cell::RefCell::new(None),
            cancelled: std::cell::Cell::new(false),
            cancel_waker: std::cell::RefCell::new(None),
        }
    }

    /// Raises the cancel latch and wakes whoever waits in [`cancelled`].
    ///
    /// [`cancelled`]: Window::cancelled
    pub fn cancel(&self) {
        self.cancelled.set(true);
        let waker = self.cancel_waker.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Resolves once [`cancel`](Window::cancel) was called (at once if it
    /// was already). One task waits at a time; a wait that is dropped
    /// takes its waker out, so a later `cancel` wakes nobody.
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled { window: self }
    }

    /// Waits until `n` bytes of window are free and takes them.
    pub async fn take(&self, n: usize) -> Result<(), WindowClosed> {
        let free = self.room(n).await?;
        // Nothing ran between the wait's end and this (one thread).
        self.avail.set(free - n);
        Ok(())
    }

    /// Waits until at least `n` bytes of window are free, and returns how
    /// many are, taking none (a sender that sizes its next read by them).
    pub async fn room(&self, n: usize) -> Result<usize, WindowClosed> {
        std::future::poll_fn(|cx| {
            if self.closed.get() {
                return std::task::Poll::Ready(Err(WindowClosed));
            }
            let a = self.avail.get();
            if a >= n {
                return std::task::Poll::Ready(Ok(a));
            }
            let old = self.waker.replace(Some(cx.waker().clone()));
            // Dropped with no borrow held (crate::sync).
            drop(old);
            std::task::Poll::Pending
        })
        .await
    }

    /// Bytes of window free now.
    pub fn free(&self) -> usize {
        self.avail.get()
    }

    /// Takes up to `n` bytes without waiting; returns how many.
    pub fn take_now(&self, n: usize) -> usize {
        let t = self.avail.get().min(n);
        self.avail.set(self.avail.get() - t);
        t
    }

    /// Credit returned by the consumer.
    pub fn add(&self, n: usize) {
        self.avail.set(self.avail.get().saturating_add(n));
        let waker = self.waker.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub fn close(&self) {
        self.closed.set(true);
        let waker = self.waker.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A request's [`Window`], shared by the tunnel's entry for the request
/// and the task that sends under it. Its allocation comes from a free
/// list of the thread (a core's runtime) and goes back to it when the last
/// holder drops it: a request costs no allocation for its window (issue
/// 11).
#[derive(Debug, Clone)]
pub struct SharedWindow(std::rc::Rc<Window>);

thread_local! {
    static WINDOWS: crate::pool::FreeList<std::rc::Rc<Window>> =
        const { crate::pool::FreeList::new(WINDOWS_KEEP) };
}

/// Windows kept per thread (about the requests a core has in flight).
const WINDOWS_KEEP: usize = 1024;

impl SharedWindow {
    pub fn new(bytes: usize) -> Self {
        if let Some(mut rc) = WINDOWS.with(|l| l.take()) {
            // Only the list held it: no other owner to see the reset.
            if let Some(w) = std::rc::Rc::get_mut(&mut rc) {
                *w = Window::new(bytes);
                return SharedWindow(rc);
            }
        }
        SharedWindow(std::rc::Rc::new(Window::new(bytes)))
    }
}

impl std::ops::Deref for SharedWindow {
    type Target = Window;
    fn deref(&self) -> &Window {
        &self.0
    }
}

impl Drop for SharedWindow {
    fn drop(&mut self) {
        if std::rc::Rc::strong_count(&self.0) != 1 || std::rc::Rc::weak_count(&self.0) != 0 {
            return;
        }
        // The last holder: a waiting task's waker is not kept alive by the
        // list (taken out before it is dropped: crate::sync).
        let waker = self.0.waker.borrow_mut().take();
        let cancel_waker = self.0.cancel_waker.borrow_mut().take();
        drop((waker, cancel_waker));
        let _ = WINDOWS.try_with(|l| l.give(self.0.clone()));
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[monoio::test(timer_enabled = true)]
    async fn waits_for_credit_and_survives_cancellation() {
        let w = std::rc::Rc::new(Window::new(10));
        w.take(6).await.unwrap();
        // A wait that is dropped before it is granted leaves no trace.
        let r = monoio::time::timeout(std::time::Duration::from_millis(5), w.take(6)).await;
        assert!(r.is_err());
        assert_eq!(w.take_now(100), 4);
        let w2 = w.clone();
        let t = monoio::spawn(async move { w2.take(5).await });
        w.add(5);
        assert_eq!(t.await, Ok(()));
        let w3 = w.clone();
        let t = monoio::spawn(async move { w3.take(1).await });
        w.close();
        assert_eq!(t.await, Err(WindowClosed));
    }

    /// A window comes from the thread's free list only once no holder is
    /// left, and starts as a new one: open, full, nobody waiting.
    #[monoio::test(timer_enabled = true)]
    async fn a_shared_window_is_reused_only_when_its_last_holder_is_gone() {
        let a = SharedWindow::new(10);
        let held = a.clone();
        a.take(7).await.unwrap();
        drop(a);
        // Still held: a new window is another one.
        let b = SharedWindow::new(10);
        assert!(!std::rc::Rc::ptr_eq(&b.0, &held.0));
        let (held_at, b_at) = (std::rc::Rc::as_ptr(&held.0), std::rc::Rc::as_ptr(&b.0));
        b.close();
        assert_eq!(held.take_now(100), 3);
        held.add(1);
        assert_eq!(held.take(1).await, Ok(()));
        drop(held);
        drop(b);
        // Both came back (closed, drained); reused, they start afresh.
        assert!(
            WINDOWS.with(|l| l.len()) >= 2,
            "both windows are in the list"
        );
        for _ in 0..2 {
            let w = SharedWindow::new(10);
            let at = std::rc::Rc::as_ptr(&w.0);
            assert!(at == held_at || at == b_at, "a window from the list");
            assert_eq!(w.take(10).await, Ok(()));
            let w2 = w.clone();
            let t = monoio::spawn(async move { w2.take(4).await });
            w.add(4);
            assert_eq!(t.await, Ok(()));
            w.close();
            w.cancel();
        }
        // Cancelled before: a reused window is not.
        let w = SharedWindow::new(1);
        let mut wait = std::pin::pin!(w.cancelled());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(std::future::Future::poll(wait.as_mut(), &mut cx).is_pending());
    }

    /// The cancel latch: a waiting task wakes when it is raised; a wait
    /// dropped before takes its waker along; raised, it resolves at once.
    #[monoio::test(timer_enabled = true)]
    async fn the_cancel_latch_wakes_its_waiter_and_stays_raised() {
        let w = SharedWindow::new(1);
        {
            let mut wait = std::pin::pin!(w.cancelled());
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(std::future::Future::poll(wait.as_mut(), &mut cx).is_pending());
            assert!(w.cancel_waker.borrow().is_some());
        }
        assert!(
            w.cancel_waker.borrow().is_none(),
            "a dropped wait left its waker"
        );
        // A waiter on another holder is woken by the cancel, then ready.
        struct Flag(std::sync::atomic::AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let woken = std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
        let waker = std::task::Waker::from(woken.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let w2 = w.clone();
        let mut wait = std::pin::pin!(w2.cancelled());
        assert!(std::future::Future::poll(wait.as_mut(), &mut cx).is_pending());
        w.cancel();
        assert!(
            woken.0.load(std::sync::atomic::Ordering::SeqCst),
            "the cancel woke the waiter"
        );
        assert!(std::future::Future::poll(wait.as_mut(), &mut cx).is_ready());
        // The latch stays raised for a later waiter.
        w.cancelled().await;
    }
}
