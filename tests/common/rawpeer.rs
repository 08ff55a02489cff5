//! A raw tunnel peer for the hardening tests: it authenticates like a real
//! receiver (bearer token on the upgrade) and then writes exactly the
//! WebSocket frames and ANPX frames a test crafts — unmasked, oversized,
//! fragmented, floods, bad CRCs, foreign request ids — using the crate's own
//! encoders (`anp_proxy::ws::frame`, `anp_proxy::protocol::anpx`).
//!
//! Blocking `std::net` with a read timeout, so a gateway that never answers
//! fails the test instead of hanging it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anp_proxy::protocol::anpx::{self, BodyCrc, ChunkInfo, FrameType, MetaRef};
use anp_proxy::protocol::features::Features;
use anp_proxy::ws::handshake::{client_key, parse_server_response, write_client_request};
use anp_proxy::ws::{encode_raw_frame, Decoder, Event, Limits, OpCodeKind, Role};
use bytes::BytesMut;

/// A fixed masking key: these tests need reproducible bytes, not secrecy.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// An ANPX request the gateway sent down the tunnel.
#[derive(Debug)]
pub struct Request {
    pub request_id: String,
    pub meta: serde_json::Value,
    /// The frame's `body_crc` (0: not computed, `nocrc`).
    pub body_crc: u32,
}

pub struct RawPeer {
    pub stream: TcpStream,
    buf: BytesMut,
    dec: Decoder,
    /// Offered `nocrc` (with `stream`): a zero body CRC is not checked.
    crc: BodyCrc,
}

impl RawPeer {
    /// Opens a tunnel with `token`, offering `features` (empty: plain v1).
    /// Panics unless the gateway answers 101.
    pub fn connect(gw: SocketAddr, token: &str, features: &str) -> RawPeer {
        let mut stream = TcpStream::connect(gw).expect("raw peer: connect");
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let _ = stream.set_nodelay(true);
        let key = client_key();
        let auth = format!("Bearer {token}");
        let mut extra = vec![("Authorization", auth.as_str())];
        if !features.is_empty() {
            extra.push(("X-ANPX-Features", features));
        }
        let mut req = Vec::new();
        write_client_request(&mut req, &gw.to_string(), "/ws", &key, &extra);
        stream.write_all(&req).expect("raw peer: send upgrade");
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        let (head_len, crc) = loop {
            match parse_server_response(&buf, &key).expect("raw peer: valid response head") {
                Some(r) => {
                    assert_eq!(
                        r.status,
                        101,
                        "raw peer: expected 101 for token {token}, got {} {}: {:?}",
                        r.status,
                        r.reason,
                        String::from_utf8_lossy(&buf)
                    );
                    // What the gateway agreed to, not what was offered.
                    let agreed = r.header("X-ANPX-Features").unwrap_or_default();
                    let nocrc = Features::parse(agreed.as_bytes()).nocrc;
                    let crc = if nocrc {
                        BodyCrc::Omitted
                    } else {
                        BodyCrc::Computed
                    };
                    break (r.head_len, crc);
                }
                None => {
                    let n = stream.read(&mut chunk).expect("raw peer: read 101");
                    assert!(n > 0, "raw peer: connection closed before the 101");
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
        };
        let _ = buf.split_to(head_len);
        let limits = Limits {
            max_frame_payload: 64 << 20,
            max_message: 64 << 20,
            max_fragments: usize::MAX,
        };
        RawPeer {
            stream,
            buf,
            dec: Decoder::new(Role::Client, limits),
            crc,
        }
    }

    /// Writes bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("raw peer: write");
    }

    /// One frame with an explicit FIN bit and mask (`None`: unmasked, which
    /// a client must never send).
    pub fn send_frame(&mut self, op: OpCodeKind, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) {
        let mut out = BytesMut::new();
        encode_raw_frame(&mut out, op, fin, payload, mask);
        self.send_raw(&out);
    }

    /// One ANPX frame as a masked binary message.
    pub fn send_binary(&mut self, msg: &[u8]) {
        self.send_frame(OpCodeKind::Binary, true, msg, Some(MASK));
    }

    /// The next WebSocket event; pings are answered with pongs and skipped
    /// (at most [`READ_TIMEOUT`] in all, so the gateway's own pings cannot
    /// keep a test waiting forever). `None` when the gateway closed the TCP
    /// connection.
    pub fn next_event(&mut self) -> Option<Event> {
        let until = Instant::now() + READ_TIMEOUT;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            assert!(
                Instant::now() < until,
                "raw peer: no event but pings within {READ_TIMEOUT:?}"
            );
            match self.dec.decode(&mut self.buf) {
                Ok(Some(Event::Ping(p))) => {
                    self.send_frame(OpCodeKind::Pong, true, &p, Some(MASK));
                }
                Ok(Some(ev)) => return Some(ev),
                Ok(None) => {}
                Err(e) => panic!("raw peer: gateway sent an invalid frame: {e}"),
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("raw peer: read failed (timeout?): {e}"),
            }
        }
    }

    /// Reads until the gateway's Close frame; returns its code. Panics if
    /// the connection ends without one.
    pub fn expect_close(&mut self) -> (Option<u16>, String) {
        let until = Instant::now() + READ_TIMEOUT;
        loop {
            match self.next_event() {
                Some(Event::Close { code, reason }) => return (code, reason),
                Some(ev) => assert!(
                    Instant::now() < until,
                    "raw peer: expected a Close within {READ_TIMEOUT:?}, last got {ev:?}"
                ),
                None => panic!("raw peer: connection closed without a Close frame"),
            }
        }
    }

    /// The next ANPX request sent down this tunnel (control messages and
    /// pongs skipped).
    pub fn next_request(&mut self) -> Request {
        loop {
            match self.next_event() {
                Some(Event::Binary(msg)) => {
                    let f = anpx::decode_frame_with(&msg, self.crc)
                        .expect("raw peer: gateway sent valid ANPX");
                    assert_eq!(
                        f.ty,
                        FrameType::Request,
                        "raw peer: expected a request frame"
                    );
                    let meta = f.http_meta.expect("raw peer: request frame has http_meta");
                    return Request {
                        request_id: f.request_id.expect("request_id").to_string(),
                        meta: serde_json::from_slice(meta).expect("http_meta is JSON"),
                        body_crc: u32::from_be_bytes(msg[16..20].try_into().unwrap()),
                    };
                }
                Some(Event::Close { code, reason }) => {
                    panic!(
                        "raw peer: tunnel closed ({code:?} {reason}) while waiting for a request"
                    )
                }
                Some(_) => continue,
                None => panic!("raw peer: connection closed while waiting for a request"),
            }
        }
    }
}

/// `resp_meta` JSON for `status` with the given headers.
pub fn resp_meta(status: u16, headers: &[(&str, &str)]) -> Vec<u8> {
    let h: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), serde_json::Value::from(*v)))
        .collect();
    serde_json::json!({"status": status, "reason": "OK", "headers": h})
        .to_string()
        .into_bytes()
}

/// An unchunked ANPX response frame.
pub fn response(request_id: &str, status: u16, body: &[u8]) -> BytesMut {
    response_with(request_id, status, body, BodyCrc::Computed)
}

/// [`response`] with its `body_crc` computed or left 0 (`nocrc`).
pub fn response_with(request_id: &str, status: u16, body: &[u8], crc: BodyCrc) -> BytesMut {
    let meta = resp_meta(status, &[("content-type", "text/plain")]);
    let mut out = BytesMut::new();
    anpx::encode_frame_with(
        FrameType::Response,
        request_id,
        Some(MetaRef::Response(&meta)),
        body,
        None,
        crc,
        &mut out,
    );
    out
}

/// One chunk of a chunked ANPX response; `meta` on chunk 0.
pub fn response_chunk(
    request_id: &str,
    meta: Option<&[u8]>,
    body: &[u8],
    chunk: ChunkInfo,
) -> BytesMut {
    let mut out = BytesMut::new();
    anpx::encode_frame(
        FrameType::Response,
        request_id,
        meta.map(MetaRef::Response),
        body,
        Some(chunk),
        &mut out,
    );
    out
}
