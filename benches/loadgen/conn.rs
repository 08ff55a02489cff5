//! One client connection as a monoio task: closed loop (send the next
//! request as soon as the last answer is in) or fixed rate (send at
//! intended times; latency runs from the intended time, so a stalled server
//! is charged for every request it delayed — coordinated-omission
//! correction as in wrk2). Reconnects after an error or `connection: close`.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::http::{Progress, ResponseParser};
use crate::stats::{ErrorKind, Stats};

const TIMER_SLACK: Duration = Duration::from_millis(1);

/// A connection's first read buffer (grown by [`read_more`] when a large
/// answer fills it).
pub const START_BUF: usize = 8 * 1024;

/// Shared by the connections of one thread (read-only).
pub struct Plan {
    pub addr: SocketAddr,
    pub request: Bytes,
    /// Results of requests sent before this are thrown away (warm-up).
    pub measure_from: Instant,
    /// No request is sent at or after this.
    pub end: Instant,
    pub timeout: Duration,
    /// Fixed-rate mode: time between two sends on one connection.
    pub interval: Option<Duration>,
}

/// Reads whatever arrives into the spare capacity of `buf`, after its
/// current contents. (A bare `read(buf)` would write from offset 0: monoio
/// fills an `IoBufMut` from its start, so appending needs `slice_mut`.)
pub async fn read_more(s: &mut TcpStream, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
    // Small until a large answer needs more: with 64 KiB reserved up
    // front, 16,000 open-loop connections held 1.3 GB.
    if buf.capacity() - buf.len() < 4 * 1024 {
        buf.reserve(64 * 1024);
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let (r, slice) = s.read(buf.slice_mut(len..cap)).await;
    (r, slice.into_inner())
}

pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ErrorKind> {
    match monoio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        _ => Err(ErrorKind::Connect),
    }
}

/// One request/response exchange on `s`. `Ok((status, keep_alive, body))`.
pub async fn exchange(
    s: &mut TcpStream,
    request: &Bytes,
    buf: &mut BytesMut,
) -> Result<(u16, bool, usize), ErrorKind> {
    let (r, _) = s.write_all(request.clone()).await;
    r.map_err(|_| ErrorKind::Io)?;
    let mut parser = ResponseParser::new();
    loop {
        match parser.advance(buf, false) {
            Ok(Progress::Done {
                status,
                keep_alive,
                body_bytes,
            }) => return Ok((status, keep_alive, body_bytes)),
            Ok(Progress::More) => {}
            Err(_) => return Err(ErrorKind::Io),
        }
        let (r, b) = read_more(s, std::mem::take(buf)).await;
        *buf = b;
        match r {
            Ok(0) => {
                return match parser.advance(buf, true) {
                    Ok(Progress::Done {
                        status, body_bytes, ..
                    }) => Ok((status, false, body_bytes)),
                    _ => Err(ErrorKind::Io),
                }
            }
            Ok(_) => {}
            Err(_) => return Err(ErrorKind::Io),
        }
    }
}

/// Drives one connection until `plan.end`. `offset` staggers the first
/// send of fixed-rate connections over one interval.
pub async fn run(plan: Rc<Plan>, stats: Rc<RefCell<Stats>>, offset: Duration) {
    let mut stream: Option<TcpStream> = None;
    let mut buf = BytesMut::with_capacity(START_BUF);
    let origin = Instant::now();
    let mut next = origin + offset;
    loop {
        // When is this request meant to go out?
        let intended = match plan.interval {
            Some(iv) => {
                let t = next;
                next += iv;
                if t >= plan.end {
                    return;
                }
                // monoio's timer has 1 ms granularity: wake up to 1 ms
                // early rather than up to 1 ms late (lateness would be
                // charged to the server), and measure from the send.
                let now = Instant::now();
                if t > now + TIMER_SLACK {
                    monoio::time::sleep(t - now - TIMER_SLACK).await;
                }
                t
            }
            None => {
                let now = Instant::now();
                if now >= plan.end {
                    return;
                }
                now
            }
        };
        // Latency runs from the intended send time when the send is late
        // (coordinated-omission correction), from the send when early.
        let intended = intended.min(Instant::now());
        let measured = intended >= plan.measure_from;
        if measured && plan.interval.is_some() {
            stats.borrow_mut().offered += 1;
        }
        let s = match stream.as_mut() {
            Some(s) => s,
            None => match connect(plan.addr, plan.timeout).await {
                Ok(s) => stream.insert(s),
                Err(k) => {
                    if Instant::now() >= plan.measure_from {
                        stats.borrow_mut().error(k);
                    }
                    // Do not spin on a refused port.
                    monoio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let left = (intended + plan.timeout).saturating_duration_since(Instant::now());
        let res = match monoio::time::timeout(left, exchange(s, &plan.request, &mut buf)).await {
            Ok(r) => r,
            Err(_) => Err(ErrorKind::Timeout),
        };
        let done = Instant::now();
        match res {
            Ok((status, keep_alive, body)) => {
                if !keep_alive {
                    stream = None;
                    buf.clear();
                }
                // A response that ends after the window still counts for
                // latency but the run's rate uses the window length only.
                if measured {
                    let mut st = stats.borrow_mut();
                    let micros = (done - intended).as_micros() as u64;
                    if (200..300).contains(&status) {
                        st.record(micros, body);
                    } else {
                        st.refused(status, micros);
                    }
                }
            }
            Err(k) => {
                stream = None;
                buf.clear();
                // By when it happened, not when the request started: a
                // request stuck since the warm-up must still show up.
                if done >= plan.measure_from {
                    stats.borrow_mut().error(k);
                }
            }
        }
    }
}

/// Idle mode: connect, make one request (so the server has really set the
/// connection up), then keep the connection open and silent. The stream
/// is kept whenever the server kept it alive, whatever the status (the
/// status is returned so the caller can report it); `Err` if the
/// connection could not be set up.
pub async fn open_idle(
    addr: SocketAddr,
    request: Bytes,
    timeout: Duration,
) -> Result<(TcpStream, u16), ErrorKind> {
    let mut s = connect(addr, timeout).await?;
    let mut buf = BytesMut::with_capacity(4096);
    match monoio::time::timeout(timeout, exchange(&mut s, &request, &mut buf)).await {
        Ok(Ok((status, true, _))) => Ok((s, status)),
        Ok(Ok(_)) => Err(ErrorKind::Io),
        Ok(Err(k)) => Err(k),
        Err(_) => Err(ErrorKind::Timeout),
    }
}
