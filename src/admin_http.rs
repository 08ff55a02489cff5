//! A small blocking HTTP/1.1 listener for the admin endpoints of both
//! sides (the gateway's `gateway/admin.rs`, the receiver's
//! `receiver/admin.rs`): loopback by default, never a public port. It runs
//! on plain threads of its own: reading counters is a cold path and must
//! never take time from the request cores.
//!
//! One accept thread hands each connection to a thread of its own, at most
//! `max_connections` at once (one more is answered 503 and closed), each
//! with `header_timeout` to send its head: a silent client holds one slot
//! for that long, never the listener. The socket is bound with
//! `SO_REUSEPORT` like the public port, so a successor process can listen
//! on the same admin port before this one drains; a drain closes it first
//! ([`Admin::close`]). What each path answers is the owner's [`Handler`].

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest admin request head, bytes (400 beyond).
const MAX_HEAD: usize = 16 * 1024;

/// What one admin request gets.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn json(status: u16, body: String) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body,
        }
    }

    /// Prometheus text exposition.
    pub fn metrics(body: String) -> Reply {
        Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body,
        }
    }

    pub fn not_found() -> Reply {
        Reply {
            status: 404,
            content_type: "text/plain",
            body: "not found\n".into(),
        }
    }
}

/// Answers `(method, path without query, draining)`; `draining` once
/// [`Admin::close`] has begun.
pub type Handler = dyn Fn(&str, &str, bool) -> Reply + Send + Sync;

/// The listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct AdminSettings {
    /// For the request head, and for the response.
    pub header_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

/// What the accept thread and [`Admin::close`] share.
struct Inner {
    handler: Arc<Handler>,
    settings: AdminSettings,
    /// Connections being served (threads alive).
    active: AtomicUsize,
    /// Raised by [`Admin::close`]: the accept thread ends on its next wakeup.
    closing: AtomicBool,
}

/// A running admin listener.
pub struct Admin {
    pub addr: SocketAddr,
    /// A second descriptor of the listening socket, to close it from the
    /// signal thread while the accept thread is blocked in `accept`.
    listener: TcpListener,
    inner: Arc<Inner>,
}

/// Binds the admin listener (`SO_REUSEADDR` + `SO_REUSEPORT`) and starts
/// its accept thread, which serves until [`Admin::close`] or the process
/// exits.
pub fn start(
    addr: SocketAddr,
    settings: AdminSettings,
    handler: Arc<Handler>,
) -> std::io::Result<Admin> {
    let listener = crate::net::bind_reuseport(addr)?;
    // Shared with a successor across a restart (OPERATIONS.md).
    crate::net::hand_on_when_closed(&listener);
    listener.set_nonblocking(false)?;
    let local = listener.local_addr()?;
    let accepting = listener.try_clone()?;
    let inner = Arc::new(Inner {
        handler,
        settings,
        active: AtomicUsize::new(0),
        closing: AtomicBool::new(false),
    });
    let i = inner.clone();
    std::thread::Builder::new()
        .name("anp-admin".into())
        .spawn(move || accept_loop(&i, accepting))?;
    Ok(Admin {
        addr: local,
        listener,
        inner,
    })
}

impl Admin {
    /// Stops listening (a drain): takes the connections the kernel already
    /// queued (they are served), then shuts the socket, which wakes the
    /// accept thread. A successor on the same port gets every new one.
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        let mut swept = 0usize;
        // O_NONBLOCK is on the open file, shared with the accept thread's
        // descriptor; its `accept` already blocking keeps blocking until
        // the shutdown below, which is all it needs to see next.
        if self.listener.set_nonblocking(true).is_ok() {
            while let Ok((conn, peer)) = self.listener.accept() {
                swept += 1;
                admit(&self.inner, conn, peer);
            }
        }
        let _ = socket2::SockRef::from(&self.listener).shutdown(Shutdown::Both);
        tracing::info!(addr = %self.addr, swept, "admin listener closed (draining)");
    }
}

fn accept_loop(inner: &Arc<Inner>, listener: TcpListener) {
    loop {
        let accepted = listener.accept();
        if inner.closing.load(Ordering::SeqCst) {
            // Woken by the shutdown, or raced it: serve what we got.
            if let Ok((conn, peer)) = accepted {
                admit(inner, conn, peer);
            }
            return;
        }
        match accepted {
            Ok((conn, peer)) => admit(inner, conn, peer),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One admin connection being served; released when its thread ends.
struct Slot(Arc<Inner>);

impl Slot {
    fn take(inner: &Arc<Inner>) -> Option<Slot> {
        let max = inner.settings.max_connections;
        inner
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(inner.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `conn` on a thread of its own, or answers 503 when
/// `admin_max_connections` are being served.
fn admit(inner: &Arc<Inner>, conn: TcpStream, peer: SocketAddr) {
    let timeout = inner.settings.header_timeout;
    // Blocking with timeouts (a connection taken by `Admin::close` came
    // from a non-blocking listener; Linux does not pass the flag on, but
    // say it anyway).
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_write_timeout(Some(timeout));
    let Some(slot) = Slot::take(inner) else {
        tracing::warn!(
            %peer,
            admin_max_connections = inner.settings.max_connections,
            "admin connection refused (503): admin_max_connections connections are being served"
        );
        refuse(conn);
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("anp-admin-conn".into())
        .spawn(move || {
            let mut conn = conn;
            if let Err(e) = serve(&slot.0, &mut conn, timeout) {
                tracing::debug!(%peer, error = %e, "admin connection failed");
            }
            // The slot is free before the client sees the close: a client
            // that read to the end may count on it.
            drop(slot);
            drop(conn);
        });
    if let Err(e) = spawned {
        // The closure, its slot and the connection are dropped.
        tracing::warn!(%peer, error = %e, "admin connection dropped: cannot spawn its thread");
    }
}

/// 503 and close, on the accept thread: the answer fits in an empty socket
/// buffer, so the write does not wait on the client.
fn refuse(mut conn: TcpStream) {
    let _ = respond(
        &mut conn,
        503,
        "text/plain",
        "admin busy: admin_max_connections reached\n",
    );
    let _ = conn.shutdown(Shutdown::Write);
    // Read what already arrived (nonblocking), so the close sends a FIN
    // after the answer rather than a reset.
    if conn.set_nonblocking(true).is_ok() {
        let mut sink = [0u8; 1024];
        while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
    }
}

fn serve(inner: &Inner, conn: &mut TcpStream, timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let limits = crate::http::Limits::default();
    let head = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = if left.is_zero() {
            Err(std::io::ErrorKind::TimedOut.into())
        } else {
            conn.set_read_timeout(Some(left))?;
            conn.read(&mut chunk)
        };
        let n = match n {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                tracing::info!(
                    peer = ?conn.peer_addr().ok(),
                    timeout = ?timeout,
                    "admin connection closed (408): no request head within admin_header_timeout"
                );
                return respond(conn, 408, "text/plain", "request head timeout\n");
            }
            Err(e) => return Err(e),
        };
        buf.extend_from_slice(&chunk[..n]);
        match crate::http::parse_request_head(&buf, &limits) {
            Ok(Some(h)) => break h,
            Ok(None) if buf.len() < MAX_HEAD => continue,
            _ => return respond(conn, 400, "text/plain", "bad request\n"),
        }
    };
    let target = head.target(&buf);
    let path = target.split('?').next().unwrap_or("");
    let draining = inner.closing.load(Ordering::SeqCst);
    let r = (inner.handler)(head.method(&buf), path, draining);
    respond(conn, r.status, r.content_type, &r.body)
}

fn respond(conn: &mut TcpStream, status: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = crate::http::headers::reason_phrase(status);
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n").into_bytes();
    crate::http::date::write_date_field(&mut head);
    head.extend_from_slice(
        format!(
            "content-type: {ctype}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    conn.write_all(&head)?;
    conn.write_all(body.as_bytes())
}
