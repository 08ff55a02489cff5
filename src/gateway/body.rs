//! Reading a request body from the client, the one way both paths use:
//! the whole-body path (a plain v1 receiver, the cross-core fallback) and
//! the streaming path (`conn.rs::stream_request`). Every read runs under
//! the body's pace (`pace.rs`: `request_body_timeout`,
//! `request_body_min_rate`); a stall is `BodyTimeout` (408), a client that
//! leaves mid-body a 400. Never writes to the client.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncReadRent;

use super::error::ProxyError;
use super::pace::{Pace, Stall};
use super::tunnel::Uploader;
use crate::http::{BodyKind, ChunkedDecoder, ChunkedStep};

pub(super) enum ReadOutcome {
    Data,
    Eof,
    TimedOut,
}

pub(super) async fn read_more<S: AsyncReadRent>(
    io: &mut S,
    buf: &mut BytesMut,
    deadline: Option<Instant>,
) -> ReadOutcome {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let b = std::mem::take(buf);
    let (res, b) = match deadline {
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            match monoio::time::timeout(left, crate::net::read_append(io, b)).await {
                Ok(r) => r,
                Err(_) => return ReadOutcome::TimedOut,
            }
        }
        None => crate::net::read_append(io, b).await,
    };
    *buf = b;
    match res {
        Ok(0) | Err(_) => ReadOutcome::Eof,
        Ok(_) => ReadOutcome::Data,
    }
}

/// One read of request-body bytes under the body's pace: 408
/// (`BodyTimeout`) when it stalls, 400 when the client leaves mid-body.
pub(super) async fn read_paced<S: AsyncReadRent>(
    io: &mut S,
    buf: &mut BytesMut,
    pace: &mut Pace,
) -> Result<(), ProxyError> {
    let before = buf.len();
    let limit = pace.deadline(Instant::now());
    match read_more(io, buf, limit.map(|(d, _)| d)).await {
        ReadOutcome::Data => {
            pace.add(buf.len() - before);
            Ok(())
        }
        ReadOutcome::Eof => Err(ProxyError::BadRequest("client went away mid-body")),
        ReadOutcome::TimedOut => Err(ProxyError::BodyTimeout(
            limit.map_or(Stall::Gap, |(_, why)| why),
        )),
    }
}

/// Sends a body piece up; the time spent waiting for the tunnel's credit
/// is not held against the client's pace (backpressure is not slowness).
pub(super) async fn send_paced(
    up: &mut Uploader,
    pace: &mut Pace,
    piece: Bytes,
    last: bool,
) -> Result<(), ProxyError> {
    let t = Instant::now();
    let r = up.send(piece, last).await;
    pace.pause(t.elapsed());
    r
}

/// Reads a whole request body (Content-Length or chunked) up to `max`.
pub(super) async fn read_body<S: AsyncReadRent>(
    io: &mut S,
    buf: &mut BytesMut,
    kind: &BodyKind,
    max: usize,
    mut pace: Pace,
) -> Result<Bytes, ProxyError> {
    pace.add(buf.len());
    match *kind {
        BodyKind::None | BodyKind::ContentLength(0) => Ok(Bytes::new()),
        BodyKind::ContentLength(n) => {
            let n = n as usize;
            if buf.len() < n {
                // Grow with the data, not with the claim: a client that
                // announces 64 MiB and sends nothing costs 1 MiB at most.
                buf.reserve((n - buf.len()).min(1 << 20));
            }
            while buf.len() < n {
                read_paced(io, buf, &mut pace).await?;
            }
            // Zero copy: the body is a slice of the read buffer.
            Ok(buf.split_to(n).freeze())
        }
        BodyKind::Chunked => {
            let mut dec = ChunkedDecoder::new(16 * 1024);
            // The chunks are joined into one buffer: a whole-message ANPX
            // frame needs the body contiguous.
            let mut body = BytesMut::new();
            loop {
                match dec.decode(buf) {
                    Ok(ChunkedStep::Data(d)) => {
                        if body.len() + d.len() > max {
                            return Err(ProxyError::BodyTooLarge(max));
                        }
                        body.extend_from_slice(&d);
                    }
                    Ok(ChunkedStep::Done) => return Ok(body.freeze()),
                    Ok(ChunkedStep::NeedMore) => read_paced(io, buf, &mut pace).await?,
                    Err(_) => return Err(ProxyError::BadRequest("invalid chunked body")),
                }
            }
        }
    }
}
