//! Where the receiver sends one response: to a `stream` gateway as it is
//! read from the app (chunk 0 with the meta as soon as the head is known,
//! then body pieces within the per-request credit window), or to a plain
//! v1 gateway as one whole message (buffered up to `max_body_size`).

use bytes::{Bytes, BytesMut};

use super::upstream::UpstreamError;
use crate::protocol::anpx::{self, binmeta, FrameType, MetaRef};
use crate::protocol::features::Features;
use crate::protocol::stream::{self, RequestId, SharedWindow, StreamEncoder};
use crate::ws::conn::{OutTx, Outgoing};

pub struct ResponseSink {
    out: OutTx,
    request_id: RequestId,
    features: Features,
    window: SharedWindow,
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
        request_id: RequestId,
        features: Features,
        window: SharedWindow,
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
            enc: StreamEncoder::with_crc(FrameType::Response, features.body_crc()),
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

    /// The meta as this gateway takes it: binary from our own gateways,
    /// JSON with only the keys it negotiated from others.
    fn wire<'a>(f: Features, meta: &'a binmeta::Response, json: &'a mut Vec<u8>) -> &'a [u8] {
        if f.binmeta {
            return meta.as_bytes();
        }
        meta.to_json_meta(f.exact).to_json(json);
        json
    }

    /// A whole response: one unchunked frame when it fits, its body sent
    /// from the upstream read buffer (no copy into the frame); else the
    /// chunks of a plain v1 message (`encode_message_with`, copied).
    fn whole(&mut self, meta: &binmeta::Response, body: Bytes) -> Result<(), UpstreamError> {
        let mut json = Vec::new();
        let wire = Some(MetaRef::Response(Self::wire(
            self.features,
            meta,
            &mut json,
        )));
        if anpx::frame_len(&self.request_id, wire, body.len(), None) <= self.chunk_size {
            let mut head = crate::pool::frame_heads::take();
            let split = anpx::encode_frame_split(
                FrameType::Response,
                &self.request_id,
                wire,
                &body,
                None,
                self.features.body_crc(),
                &mut head,
            );
            return self.send_parts((head, split), body);
        }
        self.started = true;
        let mut sent = Ok(());
        let out = &self.out;
        anpx::encode_message_with(
            FrameType::Response,
            &self.request_id,
            wire,
            &body,
            self.chunk_size,
            self.features.body_crc(),
            |f| {
                if sent.is_ok() {
                    sent = out
                        .send(Outgoing::Binary(f))
                        .map_err(|_| UpstreamError::TunnelGone);
                }
            },
        );
        sent
    }

    /// The response head, with the body bytes read so far; `complete`
    /// when that is the whole body.
    pub async fn head(
        &mut self,
        meta: binmeta::Response,
        body: Bytes,
        complete: bool,
    ) -> Result<(), UpstreamError> {
        let f = self.features;
        let mut json = Vec::new();
        if !f.stream {
            if complete {
                return self.whole(&meta, body);
            }
            if body.len() > self.max_body {
                return Err(UpstreamError::TooLarge(self.max_body));
            }
            self.held = Some((meta, BytesMut::from(&body[..])));
            return Ok(());
        }
        let wire = Self::wire(f, &meta, &mut json);
        let fits = || {
            anpx::frame_len(
                &self.request_id,
                Some(MetaRef::Response(wire)),
                body.len(),
                None,
            ) <= self.chunk_size
        };
        if complete && fits() {
            return self.whole(&meta, body);
        }
        // Streamed: chunk 0 with as much body as fits, then the rest in
        // pieces, the last one final.
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
        self.pieces(body.slice(first..), complete).await
    }

    /// How much of the body the next read may take: what the gateway's
    /// window has free, once that is `want` or half the window, whichever
    /// is less; None: not yet ([`room`](Self::room) waits). Half: the other
    /// half is still on its way to the client meanwhile, and a read then
    /// carries two pieces; reading at each quarter-window credit, one piece
    /// per read, cost 1.06x the CPU at 1 MiB responses. A plain v1 gateway
    /// takes the body whole (`held`): no limit.
    pub fn room_now(&self, want: usize) -> Option<usize> {
        match self.held {
            Some(_) => Some(usize::MAX),
            None => Some(self.window.free()).filter(|&f| f >= read_threshold(want)),
        }
    }

    /// Waits until [`room_now`](Self::room_now) gives room, and returns it.
    pub async fn room(&self, want: usize) -> Result<usize, UpstreamError> {
        if self.held.is_some() {
            return Ok(usize::MAX);
        }
        self.window
            .room(read_threshold(want))
            .await
            .map_err(|_| UpstreamError::TunnelGone)
    }

    /// More body bytes.
    pub async fn data(&mut self, body: Bytes) -> Result<(), UpstreamError> {
        self.pieces(body, false).await
    }

    /// The last body bytes: the body is complete after them. The final
    /// chunk flag rides on their last frame (no empty frame of its own).
    pub async fn data_last(&mut self, body: Bytes) -> Result<(), UpstreamError> {
        self.pieces(body, true).await
    }

    /// Body bytes as frames of at most a piece each; with `last`, the
    /// final one says so (an empty body: one empty final frame).
    async fn pieces(&mut self, mut body: Bytes, last: bool) -> Result<(), UpstreamError> {
        if let Some((_, held)) = self.held.as_mut() {
            if held.len() + body.len() > self.max_body {
                return Err(UpstreamError::TooLarge(self.max_body));
            }
            held.extend_from_slice(&body);
            if last {
                if let Some((meta, body)) = self.held.take() {
                    return self.whole(&meta, body.freeze());
                }
            }
            return Ok(());
        }
        let piece = stream::piece_size(self.chunk_size, &self.request_id, 0);
        loop {
            let p = body.split_to(body.len().min(piece));
            let fin = last && body.is_empty();
            if p.is_empty() && !fin {
                return Ok(());
            }
            self.take_window(p.len()).await?;
            let f = self.enc.body_parts(&self.request_id, &p, fin);
            self.send_parts(f, p)?;
            if body.is_empty() && (fin || !last) {
                return Ok(());
            }
        }
    }

    /// The body is complete.
    pub async fn end(&mut self) -> Result<(), UpstreamError> {
        if let Some((meta, body)) = self.held.take() {
            return self.whole(&meta, body.freeze());
        }
        let f = self.enc.body_parts(&self.request_id, &[], true);
        self.send_parts(f, Bytes::new())
    }
}

/// The window room a read of a response body waits for
/// ([`ResponseSink::room_now`]).
fn read_threshold(want: usize) -> usize {
    want.clamp(1, stream::DEFAULT_WINDOW / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::anpx::BodyCrc;
    use crate::protocol::stream::{classify, Incoming, DEFAULT_WINDOW};

    /// The frames a sink queued, each as the bytes of its WebSocket
    /// message.
    fn frames(rx: &mut crate::ws::conn::OutRx) -> Vec<Bytes> {
        let mut v = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match m {
                Outgoing::Parts { head, split, body } => {
                    let mut f = head[..split].to_vec();
                    f.extend_from_slice(&body);
                    f.extend_from_slice(&head[split..]);
                    v.push(Bytes::from(f));
                }
                Outgoing::Binary(b) => v.push(b.freeze()),
                other => panic!("not a frame: {other:?}"),
            }
        }
        v
    }

    fn sink(out: OutTx) -> ResponseSink {
        let f = Features {
            stream: true,
            binmeta: true,
            ..Features::default()
        };
        let window = SharedWindow::new(DEFAULT_WINDOW);
        ResponseSink::new(out, "0000000000000001".into(), f, window, 65536, 1 << 20)
    }

    fn meta() -> binmeta::Response {
        let mut b = binmeta::Builder::response(200, b"OK", 64);
        b.field(b"content-type", b"text/plain");
        b.finish_response()
    }

    #[monoio::test]
    async fn a_whole_response_that_fits_is_one_unchunked_frame() {
        let (tx, mut rx) = crate::ws::queue::channel();
        let body = Bytes::from(vec![7u8; 1024]);
        sink(tx).head(meta(), body.clone(), true).await.unwrap();
        let f = frames(&mut rx);
        assert_eq!(f.len(), 1);
        match classify(&f[0], FrameType::Response, BodyCrc::Computed).unwrap() {
            Incoming::Whole { body: b, .. } => assert_eq!(b, body),
            other => panic!("{other:?}"),
        }
    }

    #[monoio::test]
    async fn a_larger_body_ends_on_its_last_piece_with_no_empty_frame() {
        let (tx, mut rx) = crate::ws::queue::channel();
        let body: Bytes = (0..65536u32).map(|i| i as u8).collect();
        sink(tx).head(meta(), body.clone(), true).await.unwrap();
        let f = frames(&mut rx);
        assert_eq!(f.len(), 2, "chunk 0 and one final piece");
        let mut got = Vec::new();
        match classify(&f[0], FrameType::Response, BodyCrc::Computed).unwrap() {
            Incoming::Start { body, last, .. } => {
                assert!(!last);
                got.extend_from_slice(&body);
            }
            other => panic!("{other:?}"),
        }
        match classify(&f[1], FrameType::Response, BodyCrc::Computed).unwrap() {
            Incoming::More {
                body, last, idx, ..
            } => {
                assert!(last && idx == 1 && !body.is_empty());
                got.extend_from_slice(&body);
            }
            other => panic!("{other:?}"),
        }
        assert!(got == body[..]);

        // Streamed as read: the last piece carries the flag itself.
        let (tx, mut rx) = crate::ws::queue::channel();
        let mut s = sink(tx);
        s.head(meta(), body.slice(..1000), false).await.unwrap();
        s.data(body.slice(1000..2000)).await.unwrap();
        s.data_last(body.slice(2000..)).await.unwrap();
        let f = frames(&mut rx);
        let last: Vec<bool> = f
            .iter()
            .map(
                |m| match classify(m, FrameType::Response, BodyCrc::Computed).unwrap() {
                    Incoming::Start { last, .. } | Incoming::More { last, .. } => last,
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert_eq!(last, [false, false, true]);
    }
}
