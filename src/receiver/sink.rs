//! Where the receiver sends one response: to a `stream` gateway as it is
//! read from the app (chunk 0 with the meta as soon as the head is known,
//! then body pieces within the per-request credit window), or to a plain
//! v1 gateway as one whole message (buffered up to `max_body_size`).

use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use super::upstream::UpstreamError;
use crate::protocol::anpx::{self, binmeta, FrameType, MetaRef};
use crate::protocol::features::Features;
use crate::protocol::stream::{self, StreamEncoder, Window};
use crate::ws::conn::{OutTx, Outgoing};

pub struct ResponseSink {
    out: OutTx,
    request_id: String,
    features: Features,
    window: Rc<Window>,
    chunk_size: usize,
    max_body: usize,
    enc: StreamEncoder,
    /// Plain v1: the head and body so far.
    held: Option<(binmeta::Response, BytesMut)>,
    /// Something was sent: a failure now must end the response visibly.
    started: bool,
}

impl ResponseSink {
    pub fn new(
        out: OutTx,
        request_id: String,
        features: Features,
        window: Rc<Window>,
        chunk_size: usize,
        max_body: usize,
    ) -> Self {
        Self {
            out,
            request_id,
            features,
            window,
            chunk_size,
            max_body,
            enc: StreamEncoder::new(FrameType::Response),
            held: None,
            started: false,
        }
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    fn send_out(&mut self, m: Outgoing) -> Result<(), UpstreamError> {
        self.started = true;
        self.out.send(m).map_err(|_| UpstreamError::TunnelGone)
    }

    /// A frame whose body stays in the upstream read buffer until the
    /// writer copies it once, masking it (RFC 6455 client role).
    fn send_parts(
        &mut self,
        (head, split): (BytesMut, usize),
        body: Bytes,
    ) -> Result<(), UpstreamError> {
        self.send_out(Outgoing::Parts { head, split, body })
    }

    async fn take_window(&self, n: usize) -> Result<(), UpstreamError> {
        if n == 0 {
            return Ok(());
        }
        self.window
            .take(n)
            .await
            .map_err(|_| UpstreamError::TunnelGone)
    }

    /// The response head, with the body bytes read so far; `complete`
    /// when that is the whole body.
    pub async fn head(
        &mut self,
        meta: binmeta::Response,
        body: Bytes,
        complete: bool,
    ) -> Result<(), UpstreamError> {
        // Our own gateways take the meta as built; others get JSON with
        // only the keys they negotiated.
        let f = self.features;
        let json;
        let wire = if f.binmeta {
            meta.as_bytes()
        } else if complete || f.stream {
            let mut j = Vec::with_capacity(512);
            meta.to_json_meta(f.exact).to_json(&mut j);
            json = j;
            &json[..]
        } else {
            &[][..]
        };
        if complete {
            self.started = true;
            let mut sent = Ok(());
            let out = &self.out;
            anpx::encode_message_with(
                FrameType::Response,
                &self.request_id,
                Some(MetaRef::Response(wire)),
                &body,
                self.chunk_size,
                |f| {
                    if sent.is_ok() {
                        sent = out
                            .send(Outgoing::Binary(f))
                            .map_err(|_| UpstreamError::TunnelGone);
                    }
                },
            );
            return sent;
        }
        if !f.stream {
            if body.len() > self.max_body {
                return Err(UpstreamError::TooLarge(self.max_body));
            }
            self.held = Some((meta, BytesMut::from(&body[..])));
            return Ok(());
        }
        let first =
            stream::piece_size(self.chunk_size, &self.request_id, wire.len()).min(body.len());
        self.take_window(first).await?;
        let f = self.enc.head_parts(
            &self.request_id,
            MetaRef::Response(wire),
            &body[..first],
            false,
        );
        self.send_parts(f, body.slice(..first))?;
        self.data(body.slice(first..)).await
    }

    /// More body bytes.
    pub async fn data(&mut self, mut body: Bytes) -> Result<(), UpstreamError> {
        if let Some((_, held)) = self.held.as_mut() {
            if held.len() + body.len() > self.max_body {
                return Err(UpstreamError::TooLarge(self.max_body));
            }
            held.extend_from_slice(&body);
            return Ok(());
        }
        let piece = stream::piece_size(self.chunk_size, &self.request_id, 0);
        while !body.is_empty() {
            let p = body.split_to(body.len().min(piece));
            self.take_window(p.len()).await?;
            let f = self.enc.body_parts(&self.request_id, &p, false);
            self.send_parts(f, p)?;
        }
        Ok(())
    }

    /// The body is complete.
    pub async fn end(&mut self) -> Result<(), UpstreamError> {
        if let Some((meta, body)) = self.held.take() {
            return self.head(meta, body.freeze(), true).await;
        }
        let f = self.enc.body_parts(&self.request_id, &[], true);
        self.send_parts(f, Bytes::new())
    }
}
