//! Writing to the client: a proxied response (whole, or streamed with the
//! app's Content-Length, chunked, or close-delimited for HTTP/1.0, credit
//! returned as each piece reaches the socket) and the gateway's own error
//! replies (status from `error.rs`, the one map). Never reads the client.

use bytes::Bytes;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};

use super::conn::{watch_when_late, Late};
use super::error::{error_reply, ProxyError};
use super::forward::{write_response_head, Framing};
use super::tunnel::{BodyEvent, BodyStream, RespBody, RespHead};
use crate::http;
use crate::http::headers::Persist;
use crate::net::{Writev, COALESCE_BODY};
use crate::protocol::anpx::binmeta;

pub(super) async fn write_out<S: AsyncWriteRent>(io: &mut S, out: &mut Vec<u8>) -> bool {
    let v = std::mem::take(out);
    let (res, mut v) = io.write_all(v).await;
    v.clear();
    *out = v;
    res.is_ok()
}

pub(super) fn push_header_num(out: &mut Vec<u8>, name: &str, n: usize) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(itoa_buf(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub(super) fn itoa_buf(n: usize) -> String {
    n.to_string()
}

/// Why a response's client did not get all of it (the access log's
/// `error`; the status stays the one the client was sent).
#[derive(Debug, thiserror::Error)]
pub(super) enum Cut {
    #[error("client connection failed mid-response: {0}")]
    Write(std::io::ErrorKind),
    #[error("client went away mid-response")]
    Gone,
    #[error("response stream idle past stream_idle_timeout")]
    Idle,
    #[error("response failed mid-body: {}", failed_why(.0))]
    Failed(ProxyError),
    #[error("response body shorter than its Content-Length")]
    Short,
    #[error("receiver sent more than its Content-Length")]
    Overrun,
}

/// What failed a body on its way (the head had come: a closed tunnel is
/// just that here).
fn failed_why(e: &ProxyError) -> String {
    match e {
        ProxyError::TunnelClosed => "tunnel closed".into(),
        e => e.to_string(),
    }
}

/// How a response was written: whole (and whether the connection can
/// serve another request), or cut.
pub(super) type Written = Result<bool, Cut>;

/// Writes a proxied response. A streamed body is written as it arrives,
/// returning credit to the tunnel as each piece reaches the client; if it
/// fails midway the connection is closed without the final chunk, so the
/// client sees it. Bytes handed to the socket are added to `sent_total`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn write_response<S: AsyncWriteRent + crate::net::Readable>(
    io: &mut S,
    out: &mut Vec<u8>,
    resp: RespHead,
    is_head: bool,
    keep_alive: bool,
    http10: bool,
    settings: &super::core::Settings,
    sent_total: &mut u64,
) -> Written {
    out.clear();
    let status = resp.meta.status();
    let no_body = is_head || status == 204 || status == 304 || (100..200).contains(&status);
    let stream = match resp.body {
        RespBody::Full(body) => {
            let framing = if no_body {
                Framing::None
            } else {
                Framing::Length(body.len() as u64)
            };
            write_response_head(out, &resp.meta, framing, Persist::new(keep_alive, http10));
            let body = if no_body { Bytes::new() } else { body };
            return write_with(io, out, body, b"", sent_total)
                .await
                .map(|()| keep_alive)
                .map_err(|e| Cut::Write(e.kind()));
        }
        RespBody::Stream(s) => s,
    };
    let framing = if no_body {
        Framing::None
    } else if let Some(n) = app_content_length(&resp.meta) {
        Framing::Length(n)
    } else if !http10 {
        Framing::Chunked
    } else {
        Framing::Close
    };
    let persist = Persist::new(keep_alive && framing != Framing::Close, http10);
    write_response_head(out, &resp.meta, framing, persist);
    // The head is not written yet: it leaves with the first body piece
    // (or the end), in one write.
    let idle = settings.stream_idle_timeout;
    write_stream(io, out, stream, framing, idle, sent_total)
        .await
        .map(|()| !persist.closes())
}

/// Writes `out`, then `body`, then `tail`, in one write
/// (`net::write_joined`), adding them to `sent`; `out` comes back empty.
async fn write_with<S: AsyncWriteRent>(
    io: &mut S,
    out: &mut Vec<u8>,
    body: Bytes,
    tail: &'static [u8],
    sent: &mut u64,
) -> std::io::Result<()> {
    *sent += (out.len() + body.len() + tail.len()) as u64;
    let res = crate::net::write_joined(io, out, body, tail).await;
    out.clear();
    res
}

/// Body pieces gathered into one write at most (more wait for the next).
const GATHER_MAX: usize = 1024 * 1024;

/// A streamed response body, framed by `framing`, until its end, or
/// why it was cut. `out` holds the response head on entry: it leaves with the
/// pieces already here, and every write takes all the pieces that are
/// waiting (one `writev`, bodies uncopied), so a response whose frames
/// arrived together goes out with one submission. Credit goes back as
/// the pieces reach the socket.
async fn write_stream<S: AsyncWriteRent + crate::net::Readable>(
    io: &mut S,
    out: &mut Vec<u8>,
    stream: BodyStream,
    framing: Framing,
    idle: std::time::Duration,
    sent_total: &mut u64,
) -> Result<(), Cut> {
    let mut w = Writev::take();
    std::mem::swap(w.small(), out);
    let (r, mut w) = stream_pieces(io, w, stream, framing, idle, sent_total).await;
    std::mem::swap(w.small(), out);
    out.clear();
    Writev::give(w);
    r
}

/// `w` written on `io`: packed into whole TLS records on HTTPS
/// (`Writev::send_packed`), one `writev` otherwise.
async fn send_on<S: AsyncWriteRent + crate::net::Readable>(
    w: Writev,
    io: &mut S,
) -> (std::io::Result<()>, Writev) {
    match io.writes_records() {
        true => w.send_packed(io, crate::tls::RECORD_PLAINTEXT).await,
        false => w.send(io).await,
    }
}

/// One body piece into `w`, inside its chunk line when `chunked`: a small
/// one (an SSE event) is cheaper copied than gathered, a larger one goes
/// uncopied.
fn add_piece(w: &mut Writev, d: Bytes, chunked: bool) {
    let n = d.len();
    if chunked {
        http::write_chunk_header(w.small(), n);
    }
    if n <= COALESCE_BODY / 4 {
        w.small().extend_from_slice(&d);
    } else {
        w.body(d);
    }
    if chunked {
        w.small().extend_from_slice(b"\r\n");
    }
}

async fn stream_pieces<S: AsyncWriteRent + crate::net::Readable>(
    io: &mut S,
    mut w: Writev,
    mut stream: BodyStream,
    framing: Framing,
    idle: std::time::Duration,
    sent_total: &mut u64,
) -> (Result<(), Cut>, Writev) {
    let chunked = framing == Framing::Chunked;
    let mut sent: u64 = 0;
    // Body bytes in `w`, credited once written.
    let mut held = 0usize;
    loop {
        let ev = next_event(io, &mut w, &mut stream, &mut held, idle, sent_total).await;
        let d = match ev {
            Ok(BodyEvent::Data(d)) => d,
            Ok(BodyEvent::End) => {
                let whole = match framing {
                    Framing::Chunked => {
                        w.small().extend_from_slice(http::LAST_CHUNK);
                        Ok(())
                    }
                    Framing::Length(total) if sent < total => Err(Cut::Short),
                    _ => Ok(()),
                };
                // What is held goes out even when the body fell short:
                // the close then tells the client.
                let written = flush(&mut w, io, sent_total).await;
                return (whole.and(written), w);
            }
            Ok(BodyEvent::Failed(e)) => {
                tracing::warn!(error = %e, "response failed mid-body; closing the client connection");
                // What came before the failure still goes (the head
                // included); the length or the missing last chunk tells
                // the client that the body is cut.
                let _ = flush(&mut w, io, sent_total).await;
                return (Err(Cut::Failed(e)), w);
            }
            Err(cut) => return (Err(cut), w),
        };
        let n = d.len();
        if framing == Framing::None || n == 0 {
            stream.consumed(n);
            continue;
        }
        sent += n as u64;
        if matches!(framing, Framing::Length(total) if sent > total) {
            tracing::warn!("receiver sent more than its Content-Length; closing");
            return (Err(Cut::Overrun), w);
        }
        add_piece(&mut w, d, chunked);
        held += n;
        if w.len() >= GATHER_MAX || w.full() {
            if let Err(cut) = flush(&mut w, io, sent_total).await {
                return (Err(cut), w);
            }
            stream.consumed(std::mem::take(&mut held));
        }
    }
}

/// The response stream's next event. What `w` holds goes into the same
/// write as whatever is already waiting; when nothing is, it is written
/// first (the head at once too: an event stream's head, SSE, must reach
/// the client before its first event does) and its `held` body bytes are
/// credited. A pause longer than `WATCH_AFTER` (an app between two events
/// of a stream) also watches the client: one that leaves ends the
/// response at once and its request is cancelled at the receiver, not at
/// the app's next piece.
async fn next_event<S: AsyncWriteRent + crate::net::Readable>(
    io: &mut S,
    w: &mut Writev,
    stream: &mut BodyStream,
    held: &mut usize,
    idle: std::time::Duration,
    sent_total: &mut u64,
) -> Result<BodyEvent, Cut> {
    if !w.is_empty() {
        if let Some(ev) = poll_once(stream.next()).await {
            return Ok(ev);
        }
        flush(w, io, sent_total).await?;
        stream.consumed(std::mem::take(held));
    }
    match watch_when_late(io, std::pin::pin!(stream.next()), Some(idle)).await {
        Late::Done(ev) => Ok(ev),
        Late::TimedOut => {
            tracing::info!("response stream idle too long; closing");
            Err(Cut::Idle)
        }
        Late::Gone => {
            // Dropping the stream unfinished cancels the request at the
            // receiver (`BodyStream`'s drop).
            tracing::debug!("client went away while the response body paused");
            Err(Cut::Gone)
        }
    }
}

/// What `w` holds written on `io` (`send_on`) and counted in `sent_total`;
/// `w` comes back emptied.
async fn flush<S: AsyncWriteRent + crate::net::Readable>(
    w: &mut Writev,
    io: &mut S,
    sent_total: &mut u64,
) -> Result<(), Cut> {
    *sent_total += w.len() as u64;
    let (res, back) = send_on(std::mem::take(w), io).await;
    *w = back;
    res.map_err(|e| Cut::Write(e.kind()))
}

/// `f`'s output if it is ready at the first poll. `f` is dropped either
/// way: it must be cancel-safe (a channel receive is).
async fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| match f.as_mut().poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

/// The app's Content-Length, when it sent a valid one.
pub(super) fn app_content_length(meta: &binmeta::Response) -> Option<u64> {
    let mut found = None;
    for (n, v) in meta.fields() {
        if n.eq_ignore_ascii_case(b"content-length") {
            let v = v.trim_ascii();
            if v.is_empty() || v.len() > 19 || !v.iter().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let n = v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if found.is_some_and(|f| f != n) {
                return None;
            }
            found = Some(n);
        }
    }
    found
}

/// What [`write_error`] did.
pub(super) struct ErrorWritten {
    /// The write succeeded.
    pub ok: bool,
    pub status: u16,
    /// Bytes handed to the socket.
    pub bytes: u64,
}

/// Writes the gateway's own error reply. A client that left gets none:
/// its 499 is for the access log and the counters, never for the wire.
pub(super) async fn write_error<S: AsyncWriteRent>(
    io: &mut S,
    out: &mut Vec<u8>,
    err: &ProxyError,
    is_head: bool,
    persist: Persist,
) -> ErrorWritten {
    let r = error_reply(err);
    if let ProxyError::ClientGone(_) = err {
        return ErrorWritten {
            ok: false,
            status: r.status,
            bytes: 0,
        };
    }
    out.clear();
    http::headers::write_status_line(
        out,
        r.status,
        http::headers::reason_phrase(r.status).as_bytes(),
    );
    http::date::write_date_field(out);
    out.extend_from_slice(b"content-type: application/json\r\n");
    push_header_num(out, "content-length", r.body.len());
    if let Some(s) = r.retry_after {
        push_header_num(out, "retry-after", s as usize);
    }
    for (name, value) in &r.headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match r.close {
        true => Persist::Close,
        false => persist,
    }
    .write_field(out);
    out.extend_from_slice(b"\r\n");
    if !is_head {
        out.extend_from_slice(r.body.as_bytes());
    }
    let bytes = out.len() as u64;
    ErrorWritten {
        ok: write_out(io, out).await,
        status: r.status,
        bytes,
    }
}
