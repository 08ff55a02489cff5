//! A single-producer, single-consumer queue between two tasks of one core
//! whose shared cell comes from a free list of the thread and goes back,
//! emptied and with its room, when both halves are dropped: a streamed
//! body's pieces cost no allocation per request (issue 11: `local_sync`'s
//! unbounded channel took about two, its oneshot one). The gateway's
//! response heads and bodies (`gateway/tunnel.rs`) and the receiver's
//! request bodies use it.
//!
//! The rules of `crate::sync` hold: no borrow is held while a waker is
//! woken or a value dropped, and a wait that is dropped takes its waker
//! out. Each item type has a free list of its own
//! ([`pooled_queue_item!`](crate::pooled_queue_item)).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use super::FreeList;

/// Queues kept per thread and item type (about the streams a core has in
/// flight at once).
pub const KEEP: usize = 1024;

/// A queue that grew past this many items (a consumer far slower than its
/// producer within the credit window) is not kept.
const KEEP_MAX: usize = 64;

/// An item type with a free list of queues ([`pooled_queue_item!`]).
///
/// [`pooled_queue_item!`]: crate::pooled_queue_item
pub trait Item: Sized + 'static {
    fn free_list() -> &'static std::thread::LocalKey<FreeList<Rc<Shared<Self>>>>;
}

/// Declares the free list of queues of `$t` (one per thread).
#[macro_export]
macro_rules! pooled_queue_item {
    ($t:ty) => {
        impl $crate::pool::queue::Item for $t {
            fn free_list() -> &'static ::std::thread::LocalKey<
                $crate::pool::FreeList<::std::rc::Rc<$crate::pool::queue::Shared<$t>>>,
            > {
                ::std::thread_local! {
                    static LIST: $crate::pool::FreeList<::std::rc::Rc<$crate::pool::queue::Shared<$t>>> =
                        const { $crate::pool::FreeList::new($crate::pool::queue::KEEP) };
                }
                &LIST
            }
        }
    };
}

/// The cell both halves share.
pub struct Shared<T> {
    items: RefCell<VecDeque<T>>,
    /// The sender was dropped: once the queue is empty, it is over.
    tx_gone: Cell<bool>,
    /// The receiver was dropped: what is sent is dropped at once.
    rx_gone: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl<T> Shared<T> {
    /// Drops what is queued, one item at a time, outside the borrow.
    fn clear(&self) {
        loop {
            let it = self.items.borrow_mut().pop_front();
            match it {
                Some(it) => drop(it),
                None => break,
            }
        }
    }

    fn wake(&self) {
        // Taken out first: the wake runs with nothing borrowed.
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// A new queue: the sender and the receiver.
pub fn channel<T: Item>() -> (Tx<T>, Rx<T>) {
    let q = match T::free_list().with(|f| f.take()) {
        // Only the list held it; it was emptied and reset when it came back.
        Some(q) if Rc::strong_count(&q) == 1 => q,
        _ => Rc::new(Shared {
            items: RefCell::new(VecDeque::new()),
            tx_gone: Cell::new(false),
            rx_gone: Cell::new(false),
            waker: Cell::new(None),
        }),
    };
    (Tx(q.clone()), Rx(q))
}

/// Gives the cell back when `q` is its last holder, emptied and reset.
fn recycle<T: Item>(q: &Rc<Shared<T>>) {
    if Rc::strong_count(q) != 1 || Rc::weak_count(q) != 0 {
        return;
    }
    q.clear();
    let waker = q.waker.take();
    drop(waker);
    if q.items.borrow().capacity() > KEEP_MAX {
        return;
    }
    q.tx_gone.set(false);
    q.rx_gone.set(false);
    let _ = T::free_list().try_with(|f| f.give(q.clone()));
}

/// The sending half. Dropped, the receiver sees the end of the queue as
/// the end (the item types say whether that is a clean end).
pub struct Tx<T: Item>(Rc<Shared<T>>);

impl<T: Item> Tx<T> {
    /// Queues `item` and wakes the receiver; drops it at once if the
    /// receiver is gone.
    pub fn send(&self, item: T) {
        if self.0.rx_gone.get() {
            drop(item);
            return;
        }
        self.0.items.borrow_mut().push_back(item);
        self.0.wake();
    }
}

impl<T: Item> Drop for Tx<T> {
    fn drop(&mut self) {
        self.0.tx_gone.set(true);
        self.0.wake();
        recycle(&self.0);
    }
}

/// The receiving half.
pub struct Rx<T: Item>(Rc<Shared<T>>);

impl<T: Item> Rx<T> {
    /// The next item; `None` once the sender is gone and the queue empty.
    pub fn recv(&mut self) -> Recv<'_, T> {
        Recv { q: &self.0 }
    }
}

impl<T: Item> Drop for Rx<T> {
    fn drop(&mut self) {
        self.0.rx_gone.set(true);
        self.0.clear();
        let w = self.0.waker.take();
        drop(w);
        recycle(&self.0);
    }
}

/// [`Rx::recv`]. Dropped while pending, it takes its waker out.
pub struct Recv<'a, T> {
    q: &'a Rc<Shared<T>>,
}

impl<T> Future for Recv<'_, T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let q = self.q;
        let it = q.items.borrow_mut().pop_front();
        if it.is_some() {
            return Poll::Ready(it);
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

impl<T> Drop for Recv<'_, T> {
    fn drop(&mut self) {
        let w = self.q.waker.take();
        drop(w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An item that counts its drops.
    struct Piece(u32, Rc<Cell<u32>>);

    impl Drop for Piece {
        fn drop(&mut self) {
            self.1.set(self.1.get() + 1);
        }
    }

    crate::pooled_queue_item!(Piece);

    /// Items arrive in order whether sent before or while the receiver
    /// waits; a sender dropped ends the queue after what it queued; a
    /// receiver dropped makes later sends vanish (dropped, not kept); a
    /// queue comes back empty and reset, and is reused; a waiter dropped
    /// takes its waker along.
    #[monoio::test]
    async fn items_arrive_in_order_and_the_queue_comes_back_empty() {
        let drops = Rc::new(Cell::new(0));
        let piece = |n| Piece(n, drops.clone());
        for _ in 0..3 {
            let (tx, mut rx) = channel();
            tx.send(piece(1));
            tx.send(piece(2));
            assert_eq!(rx.recv().await.map(|p| p.0), Some(1));
            let t = monoio::spawn(async move {
                let mut got = Vec::new();
                while let Some(p) = rx.recv().await {
                    got.push(p.0);
                }
                got
            });
            // Until the receiver waits (its waker is in the cell).
            crate::sync::yield_until("the receiver waits", || {
                tx.0.waker.take().map(|w| tx.0.waker.set(Some(w))).is_some()
            })
            .await;
            tx.send(piece(3));
            drop(tx);
            assert_eq!(t.await, [2, 3]);

            let (tx, rx) = channel::<Piece>();
            assert!(tx.0.items.borrow().is_empty() && !tx.0.tx_gone.get() && !tx.0.rx_gone.get());
            tx.send(piece(4));
            let before = drops.get();
            drop(rx);
            assert_eq!(
                drops.get(),
                before + 1,
                "what was queued is dropped with the receiver"
            );
            tx.send(piece(5));
            assert_eq!(
                drops.get(),
                before + 2,
                "sent after the receiver left: dropped at once"
            );
            assert!(tx.0.items.borrow().is_empty());
            drop(tx);
        }
        assert!(Piece::free_list().with(|f| f.len()) >= 1);
        let (tx, mut rx) = channel::<Piece>();
        {
            let mut r = rx.recv();
            let mut cx = Context::from_waker(Waker::noop());
            assert!(Pin::new(&mut r).poll(&mut cx).is_pending());
        }
        assert!(tx.0.waker.take().is_none(), "a dropped wait left its waker");
        drop((tx, rx));
        // Every piece made was dropped exactly once.
        assert_eq!(drops.get(), 15);
    }
}
