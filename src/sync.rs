//! Single-thread async primitives that stay correct under cancellation.
//!
//! Owns [`Permits`], the receiver's bound on concurrent upstream calls,
//! and [`Flag`], a latch tasks wait on.
//! Never holds a `RefCell` borrow while it wakes a task or drops a value
//! that could run code (a waker, a permit): that is the class of bug that
//! killed receivers twice (issue #15). `local_sync`'s semaphore returned a
//! granted-but-unclaimed permit from `Acquire::drop` while still holding
//! its wait-list borrow, and panicked with "already borrowed" whenever a
//! waiter was granted and cancelled in the same tick; its partial
//! `acquire_many` panicked the same way a round earlier. Everything here
//! is `!Send`: one core, no atomics.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A counting semaphore with a FIFO wait queue, one permit per holder.
///
/// Cancel-safe at every point: an [`Acquire`] dropped while queued leaves
/// a tombstone that the next release skips; one dropped after it was
/// granted but before it was polled hands the permit straight on.
#[derive(Clone)]
pub struct Permits {
    inner: Rc<Inner>,
}

struct Inner {
    free: Cell<usize>,
    /// Waiters in arrival order; cancelled ones stay until skipped or
    /// compacted away.
    queue: RefCell<VecDeque<Rc<Slot>>>,
    /// Cancelled slots still in `queue`.
    tombstones: Cell<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Waiting,
    Granted,
    Cancelled,
}

struct Slot {
    state: Cell<SlotState>,
    waker: Cell<Option<Waker>>,
}

/// One unit of concurrency; returned when dropped.
pub struct Permit {
    inner: Rc<Inner>,
}

/// Waits for a permit: see [`Permits::acquire`].
pub struct Acquire {
    inner: Rc<Inner>,
    slot: Option<Rc<Slot>>,
}

/// Compact the queue once this many tombstones make up half of it.
const COMPACT_AT: usize = 64;

impl Permits {
    pub fn new(n: usize) -> Self {
        Self {
            inner: Rc::new(Inner {
                free: Cell::new(n),
                queue: RefCell::new(VecDeque::new()),
                tombstones: Cell::new(0),
            }),
        }
    }

    /// A permit when one is free and nobody queued before us; else waits
    /// in line.
    pub fn acquire(&self) -> Acquire {
        Acquire {
            inner: self.inner.clone(),
            slot: None,
        }
    }

    /// Permits free right now.
    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.inner.free.get()
    }

    /// Tasks waiting in line (cancelled ones not counted).
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.inner.queue.borrow().len() - self.inner.tombstones.get()
    }
}

impl Inner {
    /// A permit came back: to the first live waiter, else to the pool.
    fn release(&self) {
        loop {
            // The borrow ends with this statement: nothing below runs
            // while the queue is borrowed.
            let next = self.queue.borrow_mut().pop_front();
            let Some(slot) = next else {
                self.free.set(self.free.get() + 1);
                return;
            };
            match slot.state.get() {
                SlotState::Waiting => {
                    slot.state.set(SlotState::Granted);
                    let waker = slot.waker.take();
                    drop(slot);
                    if let Some(w) = waker {
                        w.wake();
                    }
                    return;
                }
                SlotState::Cancelled => self.tombstones.set(self.tombstones.get() - 1),
                SlotState::Granted => unreachable!("a granted slot is never queued"),
            }
        }
    }

    /// A queued waiter gave up: mark it, and drop the dead weight when
    /// tombstones make up half the queue (so a flood of cancelled waiters
    /// costs memory in proportion to the live ones).
    fn cancel(&self, slot: &Slot) {
        slot.state.set(SlotState::Cancelled);
        let waker = slot.waker.take();
        let t = self.tombstones.get() + 1;
        self.tombstones.set(t);
        let len = self.queue.borrow().len();
        if t >= COMPACT_AT && t * 2 >= len {
            // Cancelled slots hold no waker (taken above), so `retain`
            // drops nothing that runs code while the queue is borrowed.
            self.queue
                .borrow_mut()
                .retain(|s| s.state.get() != SlotState::Cancelled);
            self.tombstones.set(0);
        }
        drop(waker);
    }
}

impl Future for Acquire {
    type Output = Permit;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Permit> {
        let this = &mut *self;
        match &this.slot {
            None => {
                let free = this.inner.free.get();
                if free > 0 && this.inner.queue.borrow().len() == this.inner.tombstones.get() {
                    this.inner.free.set(free - 1);
                    return Poll::Ready(Permit {
                        inner: this.inner.clone(),
                    });
                }
                let slot = Rc::new(Slot {
                    state: Cell::new(SlotState::Waiting),
                    waker: Cell::new(Some(cx.waker().clone())),
                });
                this.inner.queue.borrow_mut().push_back(slot.clone());
                this.slot = Some(slot);
                Poll::Pending
            }
            Some(slot) => match slot.state.get() {
                SlotState::Granted => {
                    this.slot = None;
                    Poll::Ready(Permit {
                        inner: this.inner.clone(),
                    })
                }
                SlotState::Waiting => {
                    let old = slot.waker.replace(Some(cx.waker().clone()));
                    drop(old);
                    Poll::Pending
                }
                SlotState::Cancelled => unreachable!("only drop cancels"),
            },
        }
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        match slot.state.get() {
            SlotState::Waiting => self.inner.cancel(&slot),
            // Granted, never claimed: the permit goes to the next in line.
            SlotState::Granted => self.inner.release(),
            SlotState::Cancelled => {}
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inner.release();
    }
}

/// A one-way latch tasks can wait on: the gateway's accept loops, drain
/// and paused connections, the receiver's tunnels when it shuts down.
/// Raised once; wakes its waiters after the borrow of their list has
/// ended. A wait that ends otherwise (dropped in a `select!`) takes its
/// waker out, so however many come and go (a pause per refused request,
/// under a flood), the list holds only the waits pending now.
#[derive(Default)]
pub struct Flag {
    set: Cell<bool>,
    next: Cell<u64>,
    wakers: RefCell<HashMap<u64, Waker>>,
}

impl Flag {
    pub fn is_set(&self) -> bool {
        self.set.get()
    }

    pub fn raise(&self) {
        self.set.set(true);
        let woken: Vec<Waker> = self.wakers.borrow_mut().drain().map(|(_, w)| w).collect();
        for w in woken {
            w.wake();
        }
    }

    /// Completes once the flag is raised.
    pub fn wait(&self) -> FlagWait<'_> {
        FlagWait {
            flag: self,
            id: None,
        }
    }

    /// Waits registered now (tests).
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.wakers.borrow().len()
    }
}

/// [`Flag::wait`].
pub struct FlagWait<'a> {
    flag: &'a Flag,
    id: Option<u64>,
}

impl Future for FlagWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let flag = self.flag;
        if flag.set.get() {
            return Poll::Ready(());
        }
        let id = *self.id.get_or_insert_with(|| {
            flag.next.set(flag.next.get() + 1);
            flag.next.get()
        });
        let old = flag.wakers.borrow_mut().insert(id, cx.waker().clone());
        // Dropped with no borrow held: a waker's drop may run anything.
        drop(old);
        Poll::Pending
    }
}

impl Drop for FlagWait<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let w = self.flag.wakers.borrow_mut().remove(&id);
            drop(w);
        }
    }
}

/// Runs two fallible futures side by side until both have succeeded, or
/// until the first failure (the other is dropped then): the two directions
/// of an upgraded stream (`gateway/passthrough.rs`,
/// `receiver/passthrough.rs`), where either side failing ends both.
pub async fn both<E>(
    a: impl Future<Output = Result<(), E>>,
    b: impl Future<Output = Result<(), E>>,
) -> Result<(), E> {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    let (mut a_done, mut b_done) = (false, false);
    std::future::poll_fn(|cx| {
        if !a_done {
            if let Poll::Ready(r) = a.as_mut().poll(cx) {
                r?;
                a_done = true;
            }
        }
        if !b_done {
            if let Poll::Ready(r) = b.as_mut().poll(cx) {
                r?;
                b_done = true;
            }
        }
        if a_done && b_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Lets every task on this core that is ready now run before the caller
/// goes on. Tests use it to wait, without a timer, until a spawned task
/// has reached its own wait. (A task that wakes itself is put back at the
/// *front* of monoio's queue and would run again before anything else, so
/// the wake comes from a task spawned at the back of it.)
#[cfg(test)]
pub async fn yield_now() {
    let flag = std::rc::Rc::new(Flag::default());
    let raise = flag.clone();
    monoio::spawn(async move { raise.raise() });
    flag.wait().await
}

/// Yields (as [`yield_now`]) until `done` holds; panics naming `what` if
/// it still does not after a thousand rounds, when no task is left to run.
#[cfg(test)]
pub async fn yield_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        yield_now().await;
    }
    panic!("{what}: still not so after 1000 yields");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait dropped before the flag is raised leaves no waker behind;
    /// raising wakes the ones pending; a wait after that is ready at once.
    #[monoio::test(timer_enabled = true)]
    async fn a_flag_keeps_only_the_waits_pending_now() {
        let flag = Rc::new(Flag::default());
        for _ in 0..100 {
            let r = monoio::time::timeout(std::time::Duration::from_millis(1), flag.wait()).await;
            assert!(r.is_err(), "not raised yet");
        }
        assert_eq!(flag.waiting(), 0, "timed-out waits took their wakers out");
        let mut w = std::pin::pin!(flag.wait());
        let first = std::future::poll_fn(|cx| Poll::Ready(w.as_mut().poll(cx))).await;
        assert!(first.is_pending());
        assert_eq!(flag.waiting(), 1);
        flag.raise();
        assert_eq!(flag.waiting(), 0, "raising hands every waker out");
        w.await;
        flag.wait().await;
    }
    use proptest::prelude::*;

    fn poll(f: &mut Pin<Box<Acquire>>) -> Option<Permit> {
        let mut cx = Context::from_waker(Waker::noop());
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(p) => Some(p),
            Poll::Pending => None,
        }
    }

    #[test]
    fn granted_then_cancelled_passes_the_permit_on() {
        let p = Permits::new(1);
        let held = poll(&mut Box::pin(p.acquire())).expect("free permit");
        let mut a = Box::pin(p.acquire());
        let mut b = Box::pin(p.acquire());
        assert!(poll(&mut a).is_none() && poll(&mut b).is_none());
        drop(held); // grants `a`
        drop(a); // cancelled before it saw the grant: `b` gets it
        assert!(poll(&mut b).is_some());
        assert_eq!(p.available(), 1);
    }

    #[test]
    fn thousands_of_cancelled_waiters_leave_nothing_behind() {
        let p = Permits::new(4);
        let held: Vec<_> = (0..4)
            .map(|_| poll(&mut Box::pin(p.acquire())).unwrap())
            .collect();
        let mut waiters: Vec<_> = (0..10_000).map(|_| Box::pin(p.acquire())).collect();
        for w in &mut waiters {
            assert!(poll(w).is_none());
        }
        // Cancel all but the last; the queue compacts as it goes.
        let last = waiters.pop().unwrap();
        drop(waiters);
        assert!(p.inner.queue.borrow().len() < 2 * COMPACT_AT);
        let mut last = last;
        drop(held);
        let got = poll(&mut last);
        assert!(got.is_some());
        assert_eq!(p.available(), 3);
        assert_eq!(p.waiting(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A new task asks for a permit.
        Ask,
        /// Poll waiter `i % len`.
        Poll(usize),
        /// Drop (cancel) waiter `i % len`, granted or not.
        Cancel(usize),
        /// A holder finishes.
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Ask),
            3 => any::<usize>().prop_map(Op::Poll),
            3 => any::<usize>().prop_map(Op::Cancel),
            2 => any::<usize>().prop_map(Op::Release),
        ]
    }

    proptest! {
        /// Any interleaving of asks, polls, cancellations and releases:
        /// never more holders than permits, no permit lost, FIFO grants,
        /// no panic.
        #[test]
        fn random_cancellation_keeps_the_count(n in 1usize..6, ops in proptest::collection::vec(op(), 1..400)) {
            let p = Permits::new(n);
            let mut waiters: Vec<(u64, Pin<Box<Acquire>>)> = Vec::new();
            let mut holders: Vec<Permit> = Vec::new();
            let mut seq = 0u64;
            for op in ops {
                match op {
                    Op::Ask => {
                        let mut a = Box::pin(p.acquire());
                        match poll(&mut a) {
                            Some(permit) => holders.push(permit),
                            None => { waiters.push((seq, a)); seq += 1; }
                        }
                    }
                    Op::Poll(i) if !waiters.is_empty() => {
                        let i = i % waiters.len();
                        if let Some(permit) = poll(&mut waiters[i].1) {
                            // FIFO: nobody who asked earlier is still waiting
                            // ungranted (they'd have been granted first).
                            let me = waiters[i].0;
                            for (s, w) in &waiters {
                                if *s < me {
                                    prop_assert!(w.slot.as_ref().is_some_and(|s| s.state.get() == SlotState::Granted));
                                }
                            }
                            waiters.remove(i);
                            holders.push(permit);
                        }
                    }
                    Op::Cancel(i) if !waiters.is_empty() => {
                        let i = i % waiters.len();
                        waiters.remove(i);
                    }
                    Op::Release(i) if !holders.is_empty() => {
                        let i = i % holders.len();
                        holders.remove(i);
                    }
                    _ => {}
                }
                let granted = waiters.iter().filter(|(_, w)| w.slot.as_ref().is_some_and(|s| s.state.get() == SlotState::Granted)).count();
                prop_assert_eq!(holders.len() + granted + p.available(), n);
            }
            drop(waiters);
            drop(holders);
            prop_assert_eq!(p.available(), n);
            prop_assert_eq!(p.waiting(), 0);
        }
    }
}
