//! Open loop (`--open --rate R`): requests go out at their intended
//! times whatever the server does, each on an idle keep-alive connection
//! of this thread's pool or on a new one, up to `--max-conns`. A slow
//! server therefore meets the offered rate, not a rate that its own
//! latency has slowed down (what a fixed set of closed-loop connections
//! would send): the load of the overload runs (issue 12).
//!
//! Latency runs from the intended send time. A request whose connection
//! could not be had because all `--max-conns` are busy is counted as
//! `unsent` (the generator's limit, reported apart from the server's
//! answers). A request never outlives `timeout` after its intended time.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::net::TcpStream;

use crate::conn::{self, Plan};
use crate::stats::{ErrorKind, Stats};

const TIMER_SLACK: Duration = Duration::from_millis(1);

/// One thread's keep-alive connections: the idle ones, and how many are
/// open (idle or busy).
pub struct Pool {
    idle: RefCell<Vec<(TcpStream, BytesMut)>>,
    open: Cell<usize>,
    cap: usize,
    /// Requests started and not finished.
    outstanding: Cell<usize>,
}

impl Pool {
    pub fn new(cap: usize) -> Pool {
        Pool {
            idle: RefCell::new(Vec::new()),
            open: Cell::new(0),
            cap: cap.max(1),
            outstanding: Cell::new(0),
        }
    }
}

/// Sends one request every `interval` (this thread's share of the rate),
/// from `offset` on, until `plan.end`; then waits for the last answers.
pub async fn run(
    plan: Rc<Plan>,
    stats: Rc<RefCell<Stats>>,
    pool: Rc<Pool>,
    interval: Duration,
    offset: Duration,
) {
    let mut next = Instant::now() + offset;
    while next < plan.end {
        // monoio's timer has 1 ms granularity: wake up to 1 ms early and
        // send everything due by then (latency still runs from `next`).
        let now = Instant::now();
        if next > now + TIMER_SLACK {
            monoio::time::sleep(next - now - TIMER_SLACK).await;
        }
        let due = Instant::now() + TIMER_SLACK;
        while next <= due && next < plan.end {
            let intended = next.min(Instant::now());
            next += interval;
            let measured = intended >= plan.measure_from;
            if measured {
                stats.borrow_mut().offered += 1;
            }
            // Every connection busy: counted here, without a task (at 5x
            // most slots end so; a task each cost the generator the CPU
            // the server under test needed).
            if pool.idle.borrow().is_empty() && pool.open.get() >= pool.cap {
                if measured {
                    stats.borrow_mut().error(ErrorKind::Unsent);
                }
                continue;
            }
            pool.outstanding.set(pool.outstanding.get() + 1);
            monoio::spawn(one(plan.clone(), stats.clone(), pool.clone(), intended));
        }
    }
    // Every request ends within `timeout` of its intended time.
    while pool.outstanding.get() > 0 {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    pool.idle.borrow_mut().clear();
}

/// One request at `intended` on a pooled or new connection.
async fn one(plan: Rc<Plan>, stats: Rc<RefCell<Stats>>, pool: Rc<Pool>, intended: Instant) {
    let res = exchange_pooled(&plan, &pool, intended).await;
    pool.outstanding.set(pool.outstanding.get() - 1);
    let done = Instant::now();
    // By when it ended, as in closed loop: a request of the warm-up that
    // times out in the window counts.
    let measured = intended >= plan.measure_from;
    let mut st = stats.borrow_mut();
    match res {
        Ok((status, body)) if measured => {
            let micros = (done - intended).as_micros() as u64;
            if (200..300).contains(&status) {
                st.record(micros, body);
            } else {
                st.refused(status, micros);
            }
        }
        Ok(_) => {}
        Err(k) => {
            if done >= plan.measure_from {
                st.error(k);
            }
        }
    }
}

async fn exchange_pooled(
    plan: &Plan,
    pool: &Pool,
    intended: Instant,
) -> Result<(u16, usize), ErrorKind> {
    let deadline = intended + plan.timeout;
    let taken = pool.idle.borrow_mut().pop();
    let (mut s, mut buf) = match taken {
        Some(c) => c,
        None => {
            if pool.open.get() >= pool.cap {
                return Err(ErrorKind::Unsent);
            }
            pool.open.set(pool.open.get() + 1);
            let left = deadline.saturating_duration_since(Instant::now());
            match conn::connect(plan.addr, left).await {
                Ok(s) => (s, BytesMut::with_capacity(conn::START_BUF)),
                Err(k) => {
                    pool.open.set(pool.open.get() - 1);
                    return Err(k);
                }
            }
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let res =
        match monoio::time::timeout(left, conn::exchange(&mut s, &plan.request, &mut buf)).await {
            Ok(r) => r,
            Err(_) => Err(ErrorKind::Timeout),
        };
    match res {
        Ok((status, true, body)) => {
            pool.idle.borrow_mut().push((s, buf));
            Ok((status, body))
        }
        Ok((status, false, body)) => {
            pool.open.set(pool.open.get() - 1);
            Ok((status, body))
        }
        Err(k) => {
            pool.open.set(pool.open.get() - 1);
            Err(k)
        }
    }
}
