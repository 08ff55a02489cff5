//! The tasks that serve requests on a receiver core: a pool that grows to
//! the requests the core has at once and keeps a bounded number idle, so
//! a request costs no task (issue 11: `monoio::spawn` allocated one per
//! request, and a box for the upstream call that a spawn would otherwise
//! copy twice). A job waits in a queue only until a worker takes it: an
//! idle worker is woken, or a new one started, for every job queued.
//!
//! One core, no locks; the rules of `crate::sync` hold (a waker is taken
//! out of its cell before it is woken).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Jobs waiting for a worker, and the workers waiting for a job.
pub struct Workers<J> {
    jobs: RefCell<VecDeque<J>>,
    /// Idle workers' wakers, the latest idle last (woken first: its stack
    /// is the warmest in cache).
    idle: RefCell<Vec<Waker>>,
    /// Idle workers kept; one more that finds no job ends.
    keep_idle: usize,
}

impl<J> Workers<J> {
    pub fn new(keep_idle: usize) -> Self {
        Self {
            jobs: RefCell::new(VecDeque::new()),
            idle: RefCell::new(Vec::new()),
            keep_idle,
        }
    }

    /// Queues `job` and wakes an idle worker for it. True: none was idle,
    /// and the caller must start a worker (which takes it from [`next`]).
    ///
    /// [`next`]: Workers::next
    #[must_use]
    pub fn submit(&self, job: J) -> bool {
        self.jobs.borrow_mut().push_back(job);
        let w = self.idle.borrow_mut().pop();
        match w {
            Some(w) => {
                w.wake();
                false
            }
            None => true,
        }
    }

    /// The next job for a worker, waiting idle for one; `None` when enough
    /// workers are idle already (the caller ends).
    pub fn next(&self) -> Next<'_, J> {
        Next { w: self }
    }

    /// Idle workers (tests, metrics).
    pub fn idle(&self) -> usize {
        self.idle.borrow().len()
    }
}

/// [`Workers::next`].
pub struct Next<'a, J> {
    w: &'a Workers<J>,
}

impl<J> Future for Next<'_, J> {
    type Output = Option<J>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<J>> {
        let w = self.w;
        let job = w.jobs.borrow_mut().pop_front();
        if let Some(job) = job {
            return Poll::Ready(Some(job));
        }
        let mut idle = w.idle.borrow_mut();
        if idle.len() >= w.keep_idle {
            return Poll::Ready(None);
        }
        // A worker is polled here only when first idle or when its waker
        // was taken by `submit`: it is never in the list twice.
        idle.push(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// Every job is run once, in order per worker, by as many workers as
    /// were needed at once; after the burst at most `keep_idle` wait, and
    /// the next burst reuses them before starting new ones.
    #[monoio::test]
    async fn jobs_run_once_and_idle_workers_are_reused_then_bounded() {
        type Job = (u32, Rc<crate::sync::Flag>);
        let w: Rc<Workers<Job>> = Rc::new(Workers::new(2));
        let started = Rc::new(Cell::new(0u32));
        let done = Rc::new(RefCell::new(Vec::new()));
        let spawn = |w: &Rc<Workers<Job>>| {
            let (w, started, done) = (w.clone(), started.clone(), done.clone());
            started.set(started.get() + 1);
            monoio::spawn(async move {
                while let Some((n, gate)) = w.next().await {
                    gate.wait().await;
                    done.borrow_mut().push(n);
                }
            });
        };
        for round in 0..2u32 {
            // Five jobs held open at once: five workers busy together.
            let gates: Vec<_> = (0..5)
                .map(|_| Rc::new(crate::sync::Flag::default()))
                .collect();
            for (i, g) in gates.iter().enumerate() {
                if w.submit((round * 10 + i as u32, g.clone())) {
                    spawn(&w);
                }
            }
            // Until all five are taken (every gate has a waiter).
            crate::sync::yield_until("every gate has a waiter", || {
                gates.iter().all(|g| g.waiting() > 0)
            })
            .await;
            for g in &gates {
                g.raise();
            }
            crate::sync::yield_until("the five jobs are done", || {
                done.borrow().len() == 5 * (round as usize + 1)
            })
            .await;
            // Three of the five ended; two wait.
            crate::sync::yield_until("two workers wait", || w.idle() == 2).await;
        }
        // Round 1 reused the two idle workers and started three.
        assert_eq!(started.get(), 8);
        let mut got = done.borrow().clone();
        got.sort();
        assert_eq!(got, [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]);
    }
}
