//! Writing to the client: a proxied response (whole, or streamed with the
//! app's Content-Length, chunked, or close-delimited for HTTP/1.0, credit
//! returned as each piece reaches the socket) and the gateway's own error
//! replies (status from `error.rs`, the one map). Never reads the client.

use bytes::Bytes;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};

use super::error::{error_reply, ProxyError};
use super::forward::{write_response_head, Framing};
use super::tunnel::{BodyEvent, BodyStream, RespBody, RespHead};
use crate::http;
use crate::protocol::anpx::binmeta;

/// Bodies at most this large are copied behind the head so the response
/// leaves in one write; larger ones go as a second write without a copy.
pub(super) const COALESCE_BODY: usize = 16 * 1024;

pub(super) async fn write_out<S: AsyncWriteRent>(io: &mut S, out: &mut Vec<u8>) -> bool {
    let v = std::mem::take(out);
    let (res, mut v) = io.write_all(v).await;
    v.clear();
    *out = v;
    res.is_ok()
}

/// [`write_out`], adding the bytes handed to the socket to `sent`.
pub(super) async fn write_counted<S: AsyncWriteRent>(
    io: &mut S,
    out: &mut Vec<u8>,
    sent: &mut u64,
) -> bool {
    *sent += out.len() as u64;
    write_out(io, out).await
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

/// Writes a proxied response; true if the connection can serve another
/// request. A streamed body is written as it arrives, returning credit to
/// the tunnel as each piece reaches the client; if it fails midway the
/// connection is closed without the final chunk, so the client sees it.
/// Bytes handed to the socket are added to `sent_total`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn write_response<S: AsyncWriteRent>(
    io: &mut S,
    out: &mut Vec<u8>,
    resp: RespHead,
    is_head: bool,
    keep_alive: bool,
    http10: bool,
    settings: &super::core::Settings,
    sent_total: &mut u64,
) -> bool {
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
            write_response_head(out, &resp.meta, framing, !keep_alive);
            let body = if no_body { Bytes::new() } else { body };
            return write_with(io, out, body, b"", sent_total).await && keep_alive;
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
    let close = !keep_alive || framing == Framing::Close;
    write_response_head(out, &resp.meta, framing, close);
    if !write_counted(io, out, sent_total).await {
        return false;
    }
    let idle = settings.stream_idle_timeout;
    write_stream(io, out, stream, framing, idle, sent_total).await && !close
}

/// Writes `out`, then `body`, then `tail`: one write when the body is
/// small (copied between them), else the body goes as it is, uncopied,
/// between a write of `out` and one of `tail`.
async fn write_with<S: AsyncWriteRent>(
    io: &mut S,
    out: &mut Vec<u8>,
    body: Bytes,
    tail: &[u8],
    sent: &mut u64,
) -> bool {
    if body.len() <= COALESCE_BODY {
        out.extend_from_slice(&body);
        out.extend_from_slice(tail);
        return write_counted(io, out, sent).await;
    }
    if !out.is_empty() && !write_counted(io, out, sent).await {
        return false;
    }
    *sent += body.len() as u64;
    let (res, _) = io.write_all(body).await;
    if res.is_err() {
        return false;
    }
    out.clear();
    out.extend_from_slice(tail);
    out.is_empty() || write_counted(io, out, sent).await
}

/// A streamed response body, framed by `framing`, until its end; false
/// when the connection cannot go on (a failure, or a close-delimited
/// body).
async fn write_stream<S: AsyncWriteRent>(
    io: &mut S,
    out: &mut Vec<u8>,
    mut stream: BodyStream,
    framing: Framing,
    idle: std::time::Duration,
    sent_total: &mut u64,
) -> bool {
    let chunked = framing == Framing::Chunked;
    let mut sent: u64 = 0;
    loop {
        let Ok(ev) = monoio::time::timeout(idle, stream.next()).await else {
            tracing::info!("response stream idle too long; closing");
            return false;
        };
        let d = match ev {
            BodyEvent::Data(d) => d,
            BodyEvent::End => {
                return match framing {
                    Framing::Chunked => {
                        out.clear();
                        out.extend_from_slice(http::LAST_CHUNK);
                        write_counted(io, out, sent_total).await
                    }
                    Framing::Length(total) => sent == total,
                    Framing::None => true,
                    Framing::Close => false,
                };
            }
            BodyEvent::Failed(e) => {
                tracing::warn!(error = %e, "response failed mid-body; closing the client connection");
                return false;
            }
        };
        let n = d.len();
        if framing == Framing::None || n == 0 {
            stream.consumed(n);
            continue;
        }
        sent += n as u64;
        if matches!(framing, Framing::Length(total) if sent > total) {
            tracing::warn!("receiver sent more than its Content-Length; closing");
            return false;
        }
        out.clear();
        let tail: &[u8] = if chunked {
            http::write_chunk_header(out, n);
            b"\r\n"
        } else {
            b""
        };
        if !write_with(io, out, d, tail, sent_total).await {
            return false;
        }
        stream.consumed(n);
    }
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

/// Writes the gateway's own error reply.
pub(super) async fn write_error<S: AsyncWriteRent>(
    io: &mut S,
    out: &mut Vec<u8>,
    err: &ProxyError,
    is_head: bool,
    close: bool,
) -> ErrorWritten {
    let r = error_reply(err);
    out.clear();
    http::headers::write_status_line(
        out,
        r.status,
        http::headers::reason_phrase(r.status).as_bytes(),
    );
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
    if close || r.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
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
