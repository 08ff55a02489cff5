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

/// A streamed body's pieces: a pooled queue (`pool::queue`).
pub type BodyTx = crate::pool::queue::Tx<BodyEvent>;
pub type BodyRx = crate::pool::queue::Rx<BodyEvent>;

crate::pooled_queue_item!(BodyEvent);

/// A new body channel: the sender for the request's entry, the receiver
/// for the response's `BodyStream`.
pub fn body_channel() -> (BodyTx, BodyRx) {
    crate::pool::queue::channel()
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
}
