//! The response's hand-over, from the tunnel reader (which finds the
//! request's entry by `request_id`) to the task that waits for it: the
//! head through a oneshot, a streamed body's pieces through a channel.
//! Their shared cells come from free lists of the thread (a core's
//! runtime) and go back when both halves are dropped, a channel's queue
//! with its room. So a request costs no allocation for them (issue 11:
//! `local_sync`'s oneshot allocated one per request, its unbounded channel
//! about two per streamed response).
//!
//! The rules of `crate::sync` hold: no borrow is held while a waker is
//! woken or dropped, and a wait that is dropped takes its waker out.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use std::collections::VecDeque;

use super::error::ProxyError;
use super::tunnel::{BodyEvent, RespHead};

/// What the reader hands over: the head, or why there is none.
pub type Head = Result<RespHead, ProxyError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The sender may still send.
    Open,
    /// The value is in `value` (or was taken by the receiver).
    Sent,
    /// The sender was dropped without sending.
    Gone,
}

struct Cell1 {
    state: Cell<State>,
    value: RefCell<Option<Head>>,
    waker: Cell<Option<Waker>>,
}

impl Cell1 {
    fn new() -> Self {
        Self {
            state: Cell::new(State::Open),
            value: RefCell::new(None),
            waker: Cell::new(None),
        }
    }

    fn wake(&self) {
        // Taken out first: the wake runs with nothing borrowed.
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

thread_local! {
    static FREE: crate::pool::FreeList<Rc<Cell1>> = const { crate::pool::FreeList::new(KEEP) };
}

/// Cells kept per thread (about the requests a core has in flight).
const KEEP: usize = 1024;

/// A new hand-over: the sender for the request's entry, the receiver for
/// its task.
pub fn channel() -> (HeadTx, HeadRx) {
    let cell = match FREE.with(|f| f.take()) {
        // Only the list held it: nobody sees the reset.
        Some(mut rc) => match Rc::get_mut(&mut rc) {
            Some(c) => {
                *c = Cell1::new();
                rc
            }
            None => Rc::new(Cell1::new()),
        },
        None => Rc::new(Cell1::new()),
    };
    (HeadTx(cell.clone()), HeadRx(cell))
}

/// Gives the cell back to the thread's list when `rc` is its last holder.
/// Its value and waker are dropped first, outside any borrow.
fn recycle(rc: &Rc<Cell1>) {
    if Rc::strong_count(rc) != 1 || Rc::weak_count(rc) != 0 {
        return;
    }
    let value = rc.value.borrow_mut().take();
    let waker = rc.waker.take();
    drop((value, waker));
    let _ = FREE.try_with(|f| f.give(rc.clone()));
}

/// The sending half, kept in the request's in-flight entry. Dropped
/// without sending, the receiver gets `None`.
pub struct HeadTx(Rc<Cell1>);

impl HeadTx {
    pub fn send(self, head: Head) {
        *self.0.value.borrow_mut() = Some(head);
        self.0.state.set(State::Sent);
        self.0.wake();
        // `Drop` sees `Sent`: nothing more.
    }
}

impl Drop for HeadTx {
    fn drop(&mut self) {
        if self.0.state.get() == State::Open {
            self.0.state.set(State::Gone);
            self.0.wake();
        }
        recycle(&self.0);
    }
}

/// The receiving half: resolves to the head, or `None` once the sender is
/// gone without one. It resolves once; polled again it stays pending.
pub struct HeadRx(Rc<Cell1>);

impl Future for HeadRx {
    type Output = Option<Head>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Head>> {
        let c = &self.0;
        match c.state.get() {
            State::Sent => {
                let v = c.value.borrow_mut().take();
                if v.is_some() {
                    return Poll::Ready(v);
                }
            }
            State::Gone => return Poll::Ready(None),
            State::Open => {}
        }
        let old = c.waker.replace(Some(cx.waker().clone()));
        // Dropped with no borrow held.
        drop(old);
        Poll::Pending
    }
}

impl Drop for HeadRx {
    fn drop(&mut self) {
        let w = self.0.waker.take();
        drop(w);
        recycle(&self.0);
    }
}

/// A streamed body's queue, shared by its two halves.
struct Queue {
    events: RefCell<VecDeque<BodyEvent>>,
    /// The sender was dropped: once the queue is empty, the body is over.
    tx_gone: Cell<bool>,
    /// The receiver was dropped: what is sent is dropped at once.
    rx_gone: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

/// A queue that grew past this many pieces (a client far slower than its
/// receiver within the window) is not kept by the list.
const QUEUE_KEEP_MAX: usize = 64;

thread_local! {
    static QUEUES: crate::pool::FreeList<Rc<Queue>> = const { crate::pool::FreeList::new(KEEP) };
}

impl Queue {
    /// Drops what is queued, one piece at a time, outside the borrow.
    fn clear(&self) {
        loop {
            let ev = self.events.borrow_mut().pop_front();
            match ev {
                Some(ev) => drop(ev),
                None => break,
            }
        }
    }
}

/// A new body channel: the sender for the request's entry, the receiver
/// for the response's `BodyStream`.
pub fn body_channel() -> (BodyTx, BodyRx) {
    let fresh = || {
        Rc::new(Queue {
            events: RefCell::new(VecDeque::new()),
            tx_gone: Cell::new(false),
            rx_gone: Cell::new(false),
            waker: Cell::new(None),
        })
    };
    let q = match QUEUES.with(|f| f.take()) {
        // Only the list held it; it was emptied and reset when it came back.
        Some(q) if Rc::strong_count(&q) == 1 => q,
        _ => fresh(),
    };
    (BodyTx(q.clone()), BodyRx(q))
}

/// Gives the queue back when `q` is its last holder, emptied and reset.
fn recycle_queue(q: &Rc<Queue>) {
    if Rc::strong_count(q) != 1 || Rc::weak_count(q) != 0 {
        return;
    }
    q.clear();
    let waker = q.waker.take();
    drop(waker);
    if q.events.borrow().capacity() > QUEUE_KEEP_MAX {
        return;
    }
    q.tx_gone.set(false);
    q.rx_gone.set(false);
    let _ = QUEUES.try_with(|f| f.give(q.clone()));
}

/// The sending half of a streamed body, kept in the request's entry.
/// Dropped, the receiver sees the end of the queue as the end (without
/// `End`: a failure, as the receiver decides).
pub struct BodyTx(Rc<Queue>);

impl BodyTx {
    /// Queues `ev` and wakes the receiver; dropped at once if the
    /// receiver is gone.
    pub fn send(&self, ev: BodyEvent) {
        if self.0.rx_gone.get() {
            drop(ev);
            return;
        }
        self.0.events.borrow_mut().push_back(ev);
        if let Some(w) = self.0.waker.take() {
            w.wake();
        }
    }
}

impl Drop for BodyTx {
    fn drop(&mut self) {
        self.0.tx_gone.set(true);
        if let Some(w) = self.0.waker.take() {
            w.wake();
        }
        recycle_queue(&self.0);
    }
}

/// The receiving half, in the response's `BodyStream`.
pub struct BodyRx(Rc<Queue>);

impl BodyRx {
    /// The next piece; `None` once the sender is gone and the queue empty.
    pub fn recv(&mut self) -> Recv<'_> {
        Recv { q: &self.0 }
    }
}

impl Drop for BodyRx {
    fn drop(&mut self) {
        self.0.rx_gone.set(true);
        self.0.clear();
        let w = self.0.waker.take();
        drop(w);
        recycle_queue(&self.0);
    }
}

/// [`BodyRx::recv`]. Dropped while pending, it takes its waker out.
pub struct Recv<'a> {
    q: &'a Rc<Queue>,
}

impl Future for Recv<'_> {
    type Output = Option<BodyEvent>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<BodyEvent>> {
        let q = self.q;
        let ev = q.events.borrow_mut().pop_front();
        if ev.is_some() {
            return Poll::Ready(ev);
        }
        if q.tx_gone.get() {
            return Poll::Ready(None);
        }
        let old = q.waker.replace(Some(cx.waker().clone()));
        // Dropped with no borrow held.
        drop(old);
        Poll::Pending
    }
}

impl Drop for Recv<'_> {
    fn drop(&mut self) {
        let w = self.q.waker.take();
        drop(w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::tunnel::RespBody;
    use crate::protocol::anpx::binmeta;

    fn head(status: u16) -> Head {
        Ok(RespHead {
            meta: binmeta::Builder::response(status, b"", 0).finish_response(),
            body: RespBody::Full(bytes::Bytes::new()),
        })
    }

    /// Until the receiver has polled (its waker is in the cell).
    async fn waiting(tx: &HeadTx) {
        loop {
            let w = tx.0.waker.take();
            let there = w.is_some();
            tx.0.waker.set(w);
            if there {
                return;
            }
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    fn status(h: Option<Head>) -> Option<u16> {
        h.map(|h| h.map(|h| h.meta.status()).unwrap_or(0))
    }

    /// Sent before or after the wait began, the head arrives; a sender
    /// dropped unsent, or an error, arrives as that; a waiter dropped
    /// early leaves no waker behind; every cell is reused, and starts
    /// afresh.
    #[monoio::test(timer_enabled = true)]
    async fn the_head_arrives_once_whichever_side_goes_first() {
        for round in 0..3u16 {
            let (tx, rx) = channel();
            tx.send(head(200 + round));
            assert_eq!(status(rx.await), Some(200 + round));

            // The waiting task is woken by the send, or by the drop.
            let (tx, rx) = channel();
            let t = monoio::spawn(rx);
            waiting(&tx).await;
            tx.send(head(201));
            assert_eq!(status(t.await), Some(201));

            let (tx, rx) = channel();
            let t = monoio::spawn(rx);
            waiting(&tx).await;
            drop(tx);
            assert_eq!(status(t.await), None);

            let (tx, rx) = channel();
            tx.send(Err(ProxyError::Timeout));
            assert!(matches!(rx.await, Some(Err(ProxyError::Timeout))));

            let (tx, rx) = channel();
            {
                let mut rx = rx;
                let mut cx = Context::from_waker(Waker::noop());
                assert!(Pin::new(&mut rx).poll(&mut cx).is_pending());
                let waker = tx.0.waker.take();
                assert!(waker.is_some());
                tx.0.waker.set(waker);
            }
            assert!(tx.0.waker.take().is_none(), "a dropped wait left its waker");
            drop(tx);
        }
        // Sent, never received: the value goes with the cell, not kept by
        // the list.
        let (tx, rx) = channel();
        tx.send(head(202));
        drop(rx);
        let (tx, rx) = channel();
        assert!(tx.0.value.borrow().is_none());
        drop((tx, rx));
        assert!(FREE.with(|f| f.len()) >= 1);
    }

    fn data(ev: Option<BodyEvent>) -> Option<Vec<u8>> {
        match ev {
            Some(BodyEvent::Data(b)) => Some(b.to_vec()),
            Some(BodyEvent::End) => Some(b"END".to_vec()),
            Some(BodyEvent::Failed(_)) => Some(b"FAILED".to_vec()),
            None => None,
        }
    }

    /// Pieces arrive in order whether sent before or while the receiver
    /// waits; a sender dropped ends the body after what it queued; a
    /// receiver dropped makes later sends vanish; a queue comes back empty
    /// and reset, and is reused.
    #[monoio::test(timer_enabled = true)]
    async fn body_pieces_arrive_in_order_and_the_queue_comes_back_empty() {
        for _ in 0..3 {
            let (tx, mut rx) = body_channel();
            tx.send(BodyEvent::Data(bytes::Bytes::from_static(b"a")));
            tx.send(BodyEvent::Data(bytes::Bytes::from_static(b"b")));
            assert_eq!(data(rx.recv().await), Some(b"a".to_vec()));
            let t = monoio::spawn(async move {
                let mut got = Vec::new();
                while let Some(d) = data(rx.recv().await) {
                    got.push(d);
                }
                got
            });
            while tx.0.waker.take().map(|w| tx.0.waker.set(Some(w))).is_none() {
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            tx.send(BodyEvent::End);
            drop(tx);
            assert_eq!(t.await, [b"b".to_vec(), b"END".to_vec()]);

            let (tx, rx) = body_channel();
            assert!(tx.0.events.borrow().is_empty() && !tx.0.tx_gone.get());
            tx.send(BodyEvent::Data(bytes::Bytes::from_static(b"x")));
            drop(rx);
            tx.send(BodyEvent::Data(bytes::Bytes::from_static(b"y")));
            assert!(
                tx.0.events.borrow().is_empty(),
                "sent after the receiver left"
            );
            drop(tx);
        }
        assert!(QUEUES.with(|f| f.len()) >= 1);
        // A waiter dropped takes its waker along.
        let (tx, mut rx) = body_channel();
        {
            let mut r = rx.recv();
            let mut cx = Context::from_waker(Waker::noop());
            assert!(Pin::new(&mut r).poll(&mut cx).is_pending());
        }
        assert!(tx.0.waker.take().is_none());
        drop((tx, rx));
    }
}
