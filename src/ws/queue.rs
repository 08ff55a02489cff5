//! A tunnel's outgoing queue: any number of senders on one core (request
//! tasks, the pinger, the reader's pongs) and one receiver, the writer
//! task. It does what `local_sync::mpsc::unbounded` did for us, except
//! that it allocates nothing until a message is queued and gives back a
//! buffer a burst grew once it drains: an idle tunnel's queue costs one
//! small `Rc` (local_sync allocates a 32-slot block per channel, about
//! 2.5 KiB of `Outgoing`s, for the tunnel's whole life).
//!
//! One thread only (`Rc`, `RefCell`): no locks. No borrow is held while a
//! waker is woken or a value is dropped (`crate::sync` explains why).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// A drained queue whose buffer grew past this many slots gives it back.
const SHRINK_ABOVE: usize = 64;

struct Inner<T> {
    queue: VecDeque<T>,
    /// The receiver's, while it waits.
    waker: Option<Waker>,
    senders: usize,
    receiver: bool,
}

/// The sending half; clone it for each sender.
pub struct Tx<T>(Rc<RefCell<Inner<T>>>);

/// The receiving half (the writer task).
pub struct Rx<T>(Rc<RefCell<Inner<T>>>);

/// The receiver is gone; the value comes back.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed<T>(pub T);

/// Nothing queued (`try_recv`).
#[derive(Debug, PartialEq, Eq)]
pub struct Empty;

pub fn channel<T>() -> (Tx<T>, Rx<T>) {
    let inner = Rc::new(RefCell::new(Inner {
        queue: VecDeque::new(),
        waker: None,
        senders: 1,
        receiver: true,
    }));
    (Tx(inner.clone()), Rx(inner))
}

impl<T> Tx<T> {
    /// Queues `t`; `Err` once the receiver is gone.
    pub fn send(&self, t: T) -> Result<(), Closed<T>> {
        let waker = {
            let mut i = self.0.borrow_mut();
            if !i.receiver {
                return Err(Closed(t));
            }
            i.queue.push_back(t);
            i.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl<T> Clone for Tx<T> {
    fn clone(&self) -> Self {
        self.0.borrow_mut().senders += 1;
        Tx(self.0.clone())
    }
}

impl<T> Drop for Tx<T> {
    fn drop(&mut self) {
        let waker = {
            let mut i = self.0.borrow_mut();
            i.senders -= 1;
            if i.senders == 0 {
                i.waker.take()
            } else {
                None
            }
        };
        // The last sender gone: the receiver sees the end.
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Rx<T> {
    /// The next queued message, without waiting.
    pub fn try_recv(&mut self) -> Result<T, Empty> {
        let mut i = self.0.borrow_mut();
        match i.queue.pop_front() {
            Some(t) => Ok(t),
            None => {
                if i.queue.capacity() > SHRINK_ABOVE {
                    // Empty: dropping it drops no message.
                    i.queue = VecDeque::new();
                }
                Err(Empty)
            }
        }
    }

    /// The next message; `None` once every sender is gone and the queue
    /// is empty. Cancel-safe: a message is taken only when returned.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| {
            let mut i = self.0.borrow_mut();
            if let Some(t) = i.queue.pop_front() {
                return Poll::Ready(Some(t));
            }
            if i.senders == 0 {
                return Poll::Ready(None);
            }
            if !i.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                i.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

impl<T> Drop for Rx<T> {
    fn drop(&mut self) {
        let left = {
            let mut i = self.0.borrow_mut();
            i.receiver = false;
            i.waker = None;
            std::mem::take(&mut i.queue)
        };
        // Messages never sent (buffers, a Close) go after the borrow ends.
        drop(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[monoio::test_all(timer_enabled = true)]
    async fn delivers_in_order_and_ends_with_the_last_sender() {
        let (tx, mut rx) = channel();
        let tx2 = tx.clone();
        let reader = monoio::spawn(async move {
            let mut got = Vec::new();
            while let Some(v) = rx.recv().await {
                got.push(v);
            }
            got
        });
        for i in 0..100 {
            tx.send(i).unwrap();
            if i % 10 == 0 {
                // Lets the reader run between sends.
                crate::sync::yield_now().await;
            }
        }
        tx2.send(100).unwrap();
        drop(tx);
        drop(tx2);
        assert_eq!(reader.await, (0..=100).collect::<Vec<_>>());
    }

    #[test]
    fn an_idle_queue_holds_no_buffer_and_a_drained_burst_gives_it_back() {
        let (tx, mut rx) = channel::<u64>();
        assert_eq!(rx.0.borrow().queue.capacity(), 0);
        for i in 0..1000 {
            tx.send(i).unwrap();
        }
        assert!(rx.0.borrow().queue.capacity() >= 1000);
        for i in 0..1000 {
            assert_eq!(rx.try_recv(), Ok(i));
        }
        assert_eq!(rx.try_recv(), Err(Empty));
        assert_eq!(rx.0.borrow().queue.capacity(), 0);
    }

    #[test]
    fn send_fails_once_the_receiver_is_gone() {
        let (tx, rx) = channel();
        tx.send(1).unwrap();
        drop(rx);
        assert_eq!(tx.send(2), Err(Closed(2)));
    }
}
