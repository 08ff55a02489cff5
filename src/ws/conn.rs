//! The WebSocket IO loop on monoio's owned buffers, shared by the gateway
//! (server role) and the receiver (client role). Framing itself is the
//! sans-IO [`super::frame`]; this file only moves bytes.
//!
//! The writer task drains everything queued since its last wakeup into one
//! buffer and sends it with one `write_all` (write batching). Never blocks
//! the runtime; never touches another core's state.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use local_sync::mpsc::unbounded;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

use super::frame::{
    apply_mask, encode_close, encode_header, mask_for, Decoder, Event, OpCodeKind as OpCode, Role,
};
use super::WsError;

/// Something for the writer task to send.
#[derive(Debug)]
pub enum Outgoing {
    /// One binary message (an ANPX frame).
    Binary(BytesMut),
    /// Bytes written as they are (the 101 response head).
    Raw(Vec<u8>),
    /// A text message (JSON control message, PROTOCOL.md §6).
    Text(Vec<u8>),
    Ping(Bytes),
    Pong(Bytes),
    /// Close handshake; the writer stops after sending it.
    Close(u16, String),
}

pub type OutTx = unbounded::Tx<Outgoing>;
pub type OutRx = unbounded::Rx<Outgoing>;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("websocket protocol: {0}")]
    Ws(#[from] WsError),
    #[error("peer closed the connection")]
    Eof,
    #[error("peer silent for {0:?}")]
    Idle(Duration),
}

/// Reads WebSocket events from one connection.
pub struct WsReader<R> {
    io: R,
    buf: BytesMut,
    decoder: Decoder,
    idle: Option<Duration>,
}

const READ_CHUNK: usize = 64 * 1024;

impl<R: AsyncReadRent> WsReader<R> {
    /// `leftover`: bytes already read past the handshake.
    pub fn new(io: R, leftover: BytesMut, decoder: Decoder, idle: Option<Duration>) -> Self {
        Self {
            io,
            buf: leftover,
            decoder,
            idle,
        }
    }

    /// The next event; `Err(Idle)` when the peer sent nothing (not even a
    /// pong) for the idle window.
    pub async fn next(&mut self) -> Result<Event, ConnError> {
        loop {
            if let Some(ev) = self.decoder.decode(&mut self.buf)? {
                return Ok(ev);
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let buf = std::mem::take(&mut self.buf);
            let (res, buf) = match self.idle {
                Some(d) => {
                    match monoio::time::timeout(d, crate::net::read_append(&mut self.io, buf)).await
                    {
                        Ok(r) => r,
                        Err(_) => return Err(ConnError::Idle(d)),
                    }
                }
                None => crate::net::read_append(&mut self.io, buf).await,
            };
            self.buf = buf;
            match res {
                Ok(0) => return Err(ConnError::Eof),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Sends queued messages until the queue closes or a Close is sent.
/// Batching: everything queued at wakeup goes out in one write.
pub async fn run_writer<W: AsyncWriteRent>(mut io: W, mut rx: OutRx, role: Role) -> io::Result<()> {
    let mut batch = BytesMut::with_capacity(READ_CHUNK);
    while let Some(first) = rx.recv().await {
        let mut closing = encode_outgoing(&mut batch, role, first);
        while !closing && batch.len() < 1024 * 1024 {
            match rx.try_recv() {
                Ok(m) => closing = encode_outgoing(&mut batch, role, m),
                Err(_) => break,
            }
        }
        let (res, b) = io.write_all(batch).await;
        res?;
        batch = b;
        batch.clear();
        if closing {
            break;
        }
    }
    let _ = io.shutdown().await;
    Ok(())
}

/// Appends one message to the batch; true if it was a Close.
fn encode_outgoing(batch: &mut BytesMut, role: Role, m: Outgoing) -> bool {
    let (op, payload): (OpCode, &[u8]) = match &m {
        Outgoing::Binary(b) => (OpCode::Binary, b),
        Outgoing::Text(b) => (OpCode::Text, b),
        Outgoing::Ping(b) => (OpCode::Ping, b),
        Outgoing::Pong(b) => (OpCode::Pong, b),
        Outgoing::Raw(b) => {
            batch.extend_from_slice(b);
            return false;
        }
        Outgoing::Close(code, reason) => {
            encode_close(batch, role, *code, reason);
            return true;
        }
    };
    let mask = mask_for(role);
    encode_header(batch, op, true, payload.len(), mask);
    // Copy into the batch: one write per wakeup costs one memcpy of each
    // payload; masking (client role) needs a private copy anyway.
    let start = batch.len();
    batch.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut batch[start..], key);
    }
    false
}
