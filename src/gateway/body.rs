//! Reading a request body from the client, the one way both paths use:
//! the whole-body path (a plain v1 receiver) and the streaming paths
//! (`conn.rs::stream_request`, and `conn.rs::across_cores` to a tunnel on
//! another core). Every read runs under the body's pace (`pace.rs`:
//! `request_body_timeout`, `request_body_min_rate`); a stall is
//! `BodyTimeout` (408), a client that leaves mid-body a 400. Never writes
//! to the client.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncReadRent;

use super::error::ProxyError;
use super::pace::{Pace, Stall};
use super::tunnel::Upload;
use crate::http::{BodyKind, ChunkedDecoder, ChunkedStep};

pub(super) enum ReadOutcome {
    Data,
    Eof,
    TimedOut,
}

/// One read with the head's or body's deadline (`net::read_by`).
pub(super) async fn read_more<S: AsyncReadRent>(
    io: &mut S,
    buf: &mut BytesMut,
    deadline: Option<Instant>,
) -> ReadOutcome {
    match crate::net::read_by(io, buf, deadline).await {
        Err(_) => ReadOutcome::TimedOut,
        Ok(Ok(0)) | Ok(Err(_)) => ReadOutcome::Eof,
        Ok(Ok(_)) => ReadOutcome::Data,
    }
}

/// One read of request-body bytes under the body's pace: 408
/// (`BodyTimeout`) when it stalls, `ClientGone` when the client leaves.
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
        ReadOutcome::Eof => Err(ProxyError::ClientGone("mid-body")),
        ReadOutcome::TimedOut => Err(ProxyError::BodyTimeout(
            limit.map_or(Stall::Gap, |(_, why)| why),
        )),
    }
}

/// Room before a read of a Content-Length body gathered whole, `due`
/// bytes of it still to come: it grows with the data, not with the claim
/// (a client that announces 64 MiB and sends nothing costs 1 MiB at
/// most), doubling as it comes (`net::reserve_more`: O(n) copies), never
/// past the body's end, and 4 KiB at least, so `read_by` adds none.
fn room_for_body(buf: &mut BytesMut, due: usize) {
    if buf.capacity() - buf.len() < due.clamp(4096, 16 * 1024) {
        crate::net::reserve_more(buf, due.clamp(4096, 1 << 20), due.max(4096));
    }
}

/// One request body as it is read from the client: Content-Length or
/// chunked, bounded by `max_body_size` and paced. The whole-body path takes
/// it in one piece ([`BodyReader::gather`] with no limit); the streaming
/// path gathers the first `request_buffer_size`, then takes pieces
/// ([`BodyReader::next`]).
pub(super) struct BodyReader {
    framing: Framing,
    pace: Pace,
    max: usize,
    /// Body bytes taken so far.
    taken: usize,
}

enum Framing {
    /// Content-Length bytes still to take.
    Length(usize),
    Chunked(ChunkedDecoder),
}

/// What the buffer holds of the body right now.
enum Step {
    Piece(Bytes),
    End,
    NeedMore,
}

impl BodyReader {
    /// `buffered`: bytes already read past the head (they count for pace).
    pub(super) fn new(kind: &BodyKind, pace: Pace, max: usize, buffered: usize) -> Self {
        let framing = match *kind {
            BodyKind::None => Framing::Length(0),
            BodyKind::ContentLength(n) => Framing::Length(n as usize),
            BodyKind::Chunked => Framing::Chunked(ChunkedDecoder::new(16 * 1024)),
        };
        let mut pace = pace;
        pace.add(buffered);
        Self {
            framing,
            pace,
            max,
            taken: 0,
        }
    }

    /// Body bytes taken so far.
    pub(super) fn taken(&self) -> usize {
        self.taken
    }

    /// No body byte is left to take (known without reading only for
    /// Content-Length; a chunked body ends with [`next`](Self::next)'s None).
    pub(super) fn finished(&self) -> bool {
        matches!(self.framing, Framing::Length(0))
    }

    /// Takes what the buffer holds, at most `limit` bytes, without reading.
    fn step(&mut self, buf: &mut BytesMut, limit: usize) -> Result<Step, ProxyError> {
        let piece = match &mut self.framing {
            Framing::Length(0) => return Ok(Step::End),
            Framing::Length(_) if buf.is_empty() => return Ok(Step::NeedMore),
            Framing::Length(left) => {
                // Zero copy: the piece is a slice of the read buffer.
                let p = buf.split_to(buf.len().min(*left).min(limit)).freeze();
                *left -= p.len();
                p
            }
            Framing::Chunked(dec) => match dec.decode(buf) {
                Ok(ChunkedStep::Data(d)) => d,
                Ok(ChunkedStep::Done) => return Ok(Step::End),
                Ok(ChunkedStep::NeedMore) => return Ok(Step::NeedMore),
                Err(_) => return Err(ProxyError::BadRequest("invalid chunked body")),
            },
        };
        self.taken += piece.len();
        if self.taken > self.max {
            return Err(ProxyError::BodyTooLarge(self.max));
        }
        Ok(Step::Piece(piece))
    }

    /// The next piece of at most `limit` bytes (a chunked body's pieces are
    /// its decoded chunks, up to 16 KiB), reading the client when the
    /// buffer has none; None at the body's end.
    pub(super) async fn next<S: AsyncReadRent>(
        &mut self,
        io: &mut S,
        buf: &mut BytesMut,
        limit: usize,
    ) -> Result<Option<Bytes>, ProxyError> {
        loop {
            match self.step(buf, limit)? {
                Step::Piece(p) => return Ok(Some(p)),
                Step::End => return Ok(None),
                Step::NeedMore => read_paced(io, buf, &mut self.pace).await?,
            }
        }
    }

    /// Reads until the body is complete or at least `want` bytes of it
    /// are here; returns them in one buffer and whether that is the whole
    /// body. A Content-Length body is a zero-copy slice of the read
    /// buffer; chunked data is joined (an ANPX frame needs it contiguous).
    pub(super) async fn gather<S: AsyncReadRent>(
        &mut self,
        io: &mut S,
        buf: &mut BytesMut,
        want: usize,
    ) -> Result<(Bytes, bool), ProxyError> {
        if let Framing::Length(left) = self.framing {
            let need = left.min(want);
            while buf.len() < need {
                room_for_body(buf, need - buf.len());
                read_paced(io, buf, &mut self.pace).await?;
            }
            let first = match self.step(buf, usize::MAX)? {
                Step::Piece(p) => p,
                _ => Bytes::new(),
            };
            return Ok((first, self.finished()));
        }
        let mut first = BytesMut::new();
        loop {
            match self.step(buf, usize::MAX)? {
                Step::Piece(d) => first.extend_from_slice(&d),
                Step::End => return Ok((first.freeze(), true)),
                Step::NeedMore if first.len() < want => read_paced(io, buf, &mut self.pace).await?,
                Step::NeedMore => return Ok((first.freeze(), false)),
            }
        }
    }

    /// Sends a body piece up; the time spent waiting for the tunnel's
    /// credit (or, across cores, for room in the channel the credit
    /// drains) is not held against the client's pace (backpressure is not
    /// slowness).
    pub(super) async fn send(
        &mut self,
        up: &mut Upload,
        piece: Bytes,
        last: bool,
    ) -> Result<(), ProxyError> {
        let t = Instant::now();
        let r = up.send(piece, last).await;
        self.pace.pause(t.elapsed());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64 MiB body gathered whole is copied about once (the buffer
    /// doubles, `net::reserve_more`), ends in a buffer of its size, and a
    /// small body gets a buffer of its size at once: one read's room.
    #[test]
    fn a_body_gathered_whole_is_copied_about_once_into_a_buffer_of_its_size() {
        const WHOLE: usize = 64 << 20;
        let (copied, grown, capacity) = crate::net::tests::gather(WHOLE, |b| {
            let due = WHOLE - b.len();
            room_for_body(b, due)
        });
        assert!(copied <= WHOLE, "{copied} bytes copied to gather 64 MiB");
        assert!(grown <= 8, "{grown} new buffers to gather 64 MiB");
        assert_eq!(capacity, WHOLE, "the last buffer is the body's size");
        let (copied, grown, capacity) = crate::net::tests::gather(40_000, |b| {
            let due = 40_000 - b.len();
            room_for_body(b, due)
        });
        assert_eq!((copied, grown, capacity), (0, 1, 40_000));
    }
}
