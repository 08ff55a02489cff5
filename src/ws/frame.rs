//! WebSocket framing (RFC 6455 §5): a sans-IO decoder that turns bytes into
//! [`Event`]s, and encoders that append frames to a buffer.
//!
//! Owns: header validation, unmasking, reassembly of fragmented messages,
//! size limits, close-frame parsing. Must never: do IO, block, allocate per
//! frame on the unfragmented-binary path (that path carries every ANPX frame,
//! PROTOCOL.md §1), or consume a frame it has not fully received.
//!
//! Header bytes are parsed and formatted by tungstenite's `FrameHeader`; the
//! rest (policy, reassembly, limits) is ours because tungstenite's own
//! codec is tied to `Read`/`Write` streams.

use std::io::Cursor;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tungstenite::error::ProtocolError;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use super::error::WsError;

/// Largest payload of a control frame (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Which end of the connection we are; decides masking (RFC 6455 §5.1, §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts the upgrade (the gateway). Incoming frames must be masked;
    /// outgoing frames are not.
    Server,
    /// Opens the upgrade (the receiver). Incoming frames must be unmasked;
    /// outgoing frames are masked with a fresh random key each.
    Client,
}

/// Resource limits the decoder enforces before buffering a payload.
///
/// The caller derives them from the ANPX `chunk_size` (PROTOCOL.md §5): one
/// ANPX frame is one WebSocket message, so a message never needs to be much
/// larger than a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of a single data frame (close 1009 above it).
    pub max_frame_payload: usize,
    /// Largest reassembled data message (close 1009 above it).
    pub max_message: usize,
    /// Most frames one data message may span, the first frame included, so
    /// `1` forbids fragmentation (close 1008 above it).
    pub max_fragments: usize,
}

/// One decoded unit: a whole data message or one control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A binary message (an ANPX frame, PROTOCOL.md §1).
    Binary(Bytes),
    /// A text message; the bytes are valid UTF-8 (checked, RFC 6455 §8.1).
    Text(Bytes),
    /// A ping; RFC 6455 §5.5.2 says answer with a pong carrying this payload.
    Ping(Bytes),
    /// A pong (RFC 6455 §5.5.3).
    Pong(Bytes),
    /// A close frame (RFC 6455 §5.5.1). `code` is `None` for an empty
    /// payload; the code, when present, has been checked against §7.4.
    Close {
        /// Status code, if the peer sent one.
        code: Option<u16>,
        /// UTF-8 reason, possibly empty.
        reason: String,
    },
}

/// Frame opcodes we send (RFC 6455 §5.2, §11.8). Reserved opcodes are not
/// representable, so an encoder cannot emit one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCodeKind {
    /// 0x0
    Continuation,
    /// 0x1
    Text,
    /// 0x2
    Binary,
    /// 0x8
    Close,
    /// 0x9
    Ping,
    /// 0xA
    Pong,
}

impl From<OpCodeKind> for OpCode {
    fn from(kind: OpCodeKind) -> OpCode {
        match kind {
            OpCodeKind::Continuation => OpCode::Data(Data::Continue),
            OpCodeKind::Text => OpCode::Data(Data::Text),
            OpCodeKind::Binary => OpCode::Data(Data::Binary),
            OpCodeKind::Close => OpCode::Control(Control::Close),
            OpCodeKind::Ping => OpCode::Control(Control::Ping),
            OpCodeKind::Pong => OpCode::Control(Control::Pong),
        }
    }
}

// ---------------------------------------------------------------------------
// Masking
// ---------------------------------------------------------------------------

/// XOR `buf` with the 4-byte masking key (RFC 6455 §5.3); applying it twice
/// restores the input. `buf` must start at payload offset 0.
///
/// Why our own: tungstenite 0.30 keeps its `mask` module private
/// (`mod mask;` in `protocol/frame/mod.rs`), and its fast path uses
/// `align_to_mut` (unsafe). This one is safe: it widens the key to a u64 and
/// XORs 8 bytes at a time. Because 8 is a multiple of 4, every chunk starts
/// at key index 0, and so does the remainder.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    if key == [0; 4] {
        return; // XOR with zeros (a `zeromask` receiver, PROTOCOL.md §7.7)
    }
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i & 3];
    }
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Bytes a frame header takes for this payload length (RFC 6455 §5.2): 2,
/// plus 2 for lengths 126..=65535 or 8 above, plus 4 for a masking key. Lets
/// a caller reserve header + payload in one pooled buffer.
pub fn header_len(payload_len: usize, masked: bool) -> usize {
    let ext = match payload_len {
        0..=125 => 0,
        126..=0xFFFF => 2,
        _ => 8,
    };
    2 + ext + if masked { 4 } else { 0 }
}

/// Append one frame header to `out` (RFC 6455 §5.2). RSV bits are always 0:
/// no extension is ever negotiated. The payload, masked with `mask` if any,
/// must follow; see [`encode_frame`].
pub fn encode_header(
    out: &mut BytesMut,
    opcode: OpCodeKind,
    fin: bool,
    payload_len: usize,
    mask: Option<[u8; 4]>,
) {
    let header = FrameHeader {
        is_final: fin,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode: opcode.into(),
        mask,
    };
    out.reserve(header_len(payload_len, mask.is_some()));
    // Writing into a growable BytesMut cannot fail; `format` only returns a
    // Result because it is generic over `io::Write`.
    header
        .format(payload_len as u64, &mut out.writer())
        .expect("writing a frame header into BytesMut is infallible");
}

/// Append one frame with an explicit FIN bit and masking key: the building
/// block for fragmented messages (RFC 6455 §5.4) and for tests that need a
/// known key. The payload is copied once and masked in the copy.
pub fn encode_raw_frame(
    out: &mut BytesMut,
    opcode: OpCodeKind,
    fin: bool,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    out.reserve(header_len(payload.len(), mask.is_some()) + payload.len());
    encode_header(out, opcode, fin, payload.len(), mask);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key);
    }
}

/// How a writer masks what it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masking {
    /// The server role: frames are not masked.
    Unmasked,
    /// The client role: a fresh random key per frame (RFC 6455 §5.3).
    Random,
    /// The client role towards a gateway that negotiated `zeromask`: the
    /// MASK bit and an all-zero key, so the payload is sent as it is
    /// (PROTOCOL.md §7.7).
    Zero,
}

impl Masking {
    /// The key the next frame's header carries, if masked.
    pub fn key(self) -> Option<[u8; 4]> {
        match self {
            Masking::Unmasked => None,
            Masking::Random => Some(rand::random()),
            Masking::Zero => Some([0; 4]),
        }
    }

    /// Whether the payload must be copied to be masked.
    pub fn transforms(self) -> bool {
        self == Masking::Random
    }
}

/// The masking key for a frame sent by `role`: a fresh unpredictable key per
/// frame for a client (RFC 6455 §5.3, §10.3), none for a server (§5.1).
pub fn mask_for(role: Role) -> Option<[u8; 4]> {
    match role {
        Role::Client => Some(rand::random()),
        Role::Server => None,
    }
}

/// Append one unfragmented frame (FIN set) as `role` sends it: masked with a
/// random key when `role` is [`Role::Client`].
pub fn encode_frame(out: &mut BytesMut, role: Role, opcode: OpCodeKind, payload: &[u8]) {
    encode_raw_frame(out, opcode, true, payload, mask_for(role));
}

/// Append a close frame with `code` and `reason` (RFC 6455 §5.5.1). The
/// reason is cut at a char boundary so the payload stays within the 125
/// bytes a control frame may carry (§5.5).
pub fn encode_close(out: &mut BytesMut, role: Role, code: u16, reason: &str) {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason);
    encode_frame(out, role, OpCodeKind::Close, &payload[..2 + reason.len()]);
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// A fragmented data message being reassembled (RFC 6455 §5.4).
#[derive(Debug)]
struct Partial {
    text: bool,
    data: BytesMut,
    fragments: usize,
}

/// Sans-IO frame decoder for one connection direction.
///
/// Feed it the bytes read from the socket with [`Decoder::decode`]; it
/// returns one [`Event`] per call, or `Ok(None)` when the buffer does not
/// hold the rest of a frame yet. After an `Err` the connection must be
/// failed (RFC 6455 §7.1.7) with [`WsError::close_code`]; the decoder's
/// state is then unspecified.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    limits: Limits,
    partial: Option<Partial>,
    needed: usize,
}

impl Decoder {
    /// A decoder for frames received by `role`, enforcing `limits`.
    pub fn new(role: Role, limits: Limits) -> Self {
        Decoder {
            role,
            limits,
            partial: None,
            needed: 0,
        }
    }

    /// After `decode` returned `Ok(None)`: how many more bytes, at least,
    /// must arrive before the next call can make progress (always ≥ 1).
    /// It is a lower bound: while the header is incomplete it counts only
    /// header bytes. `0` after any other outcome.
    pub fn needed(&self) -> usize {
        self.needed
    }

    /// Whether a fragmented message is open (its first frames consumed).
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Decode the next event from the front of `buf`.
    ///
    /// Consumes only complete frames. A non-final fragment is consumed into
    /// the decoder's reassembly state and decoding continues with the next
    /// frame in `buf`, so `Ok(None)` always means "`buf` holds no complete
    /// frame": read more and call again with the same (grown) buffer. A
    /// control frame inside a fragmented message is returned at once (RFC
    /// 6455 §5.4 allows the interleaving).
    ///
    /// Hot path: an unfragmented binary frame is returned as a zero-copy
    /// `split_to(..).freeze()` of `buf`, unmasked in place.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, WsError> {
        self.needed = 0;
        loop {
            let mut cursor = Cursor::new(&buf[..]);
            // `parse` rewinds and returns Ok(None) on a partial header, so
            // nothing is consumed until the whole frame is here.
            let parsed = FrameHeader::parse(&mut cursor).map_err(|e| match e {
                tungstenite::Error::Protocol(ProtocolError::InvalidOpcode(op)) => {
                    WsError::UnknownOpcode(op)
                }
                other => WsError::Header(other),
            })?;
            let Some((header, len)) = parsed else {
                self.needed = missing_header_bytes(buf);
                return Ok(None);
            };
            let head_len = cursor.position() as usize;

            // Validate before waiting for the payload, so an oversized or
            // bogus frame fails at once instead of being buffered.
            let first = buf[0];
            let payload_len = self.check_header(&header, first, len)?;

            let frame_len = head_len + payload_len;
            if buf.len() < frame_len {
                self.needed = frame_len - buf.len();
                return Ok(None);
            }

            buf.advance(head_len);
            let mut payload = buf.split_to(payload_len);
            if let Some(key) = header.mask {
                apply_mask(&mut payload, key);
            }

            match header.opcode {
                OpCode::Control(Control::Ping) => return Ok(Some(Event::Ping(payload.freeze()))),
                OpCode::Control(Control::Pong) => return Ok(Some(Event::Pong(payload.freeze()))),
                OpCode::Control(_) => return parse_close(&payload).map(Some),
                OpCode::Data(Data::Continue) => {
                    // `check_header` guarantees an open message here.
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(WsError::UnexpectedContinuation);
                    };
                    // Copy: fragmented messages are rare on a tunnel (ANPX
                    // sends one frame per message), so reassembly may copy.
                    partial.data.extend_from_slice(&payload);
                    partial.fragments += 1;
                    if header.is_final {
                        if let Some(done) = self.partial.take() {
                            return finish(done.text, done.data).map(Some);
                        }
                    }
                }
                OpCode::Data(data) => {
                    let text = data == Data::Text;
                    if header.is_final {
                        return finish(text, payload).map(Some);
                    }
                    // First fragment: keep its buffer (no copy yet); later
                    // fragments extend it.
                    self.partial = Some(Partial {
                        text,
                        data: payload,
                        fragments: 1,
                    });
                }
            }
        }
    }

    /// All checks that need only the header (RFC 6455 §5.1–§5.5), plus the
    /// limits. Returns the payload length as usize.
    fn check_header(&self, header: &FrameHeader, first: u8, len: u64) -> Result<usize, WsError> {
        // §5.2: RSV bits MUST be 0 unless an extension defines them; we
        // negotiate none.
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(WsError::ReservedBits(first));
        }
        // §5.1: clients mask, servers do not; either side fails otherwise.
        match (self.role, header.mask.is_some()) {
            (Role::Server, false) => return Err(WsError::UnmaskedFrame),
            (Role::Client, true) => return Err(WsError::MaskedFrame),
            _ => {}
        }
        // §5.2: "the most significant bit MUST be 0" in a 64-bit length.
        if len >> 63 != 0 {
            return Err(WsError::InvalidLength);
        }
        match header.opcode {
            OpCode::Control(_) => {
                // §5.5: control frames are never fragmented, payload ≤ 125.
                if !header.is_final {
                    return Err(WsError::FragmentedControl);
                }
                if len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(WsError::ControlTooLong(len));
                }
                Ok(len as usize)
            }
            OpCode::Data(data) => {
                let limits = &self.limits;
                if len > limits.max_frame_payload as u64 {
                    return Err(WsError::FrameTooLarge {
                        len,
                        limit: limits.max_frame_payload,
                    });
                }
                // §5.4: a continuation needs an open message; a new message
                // may not start while one is open.
                let (so_far, fragments) = match (data, &self.partial) {
                    (Data::Continue, Some(p)) => (p.data.len() as u64, p.fragments),
                    (Data::Continue, None) => return Err(WsError::UnexpectedContinuation),
                    (_, Some(_)) => return Err(WsError::ExpectedContinuation),
                    (_, None) => (0, 0),
                };
                let total = so_far + len;
                if total > limits.max_message as u64 {
                    return Err(WsError::MessageTooLarge {
                        len: total,
                        limit: limits.max_message,
                    });
                }
                if fragments + 1 > limits.max_fragments {
                    return Err(WsError::TooManyFragments {
                        limit: limits.max_fragments,
                    });
                }
                // Fits: len ≤ max_frame_payload, a usize.
                Ok(len as usize)
            }
        }
    }
}

/// Turn a complete data message into its event. Text is validated as a
/// whole (RFC 6455 §8.1); validating per fragment would fail a bad message a
/// few frames earlier, which the message-size limit makes unimportant.
fn finish(text: bool, data: BytesMut) -> Result<Event, WsError> {
    if text {
        if std::str::from_utf8(&data).is_err() {
            return Err(WsError::InvalidUtf8);
        }
        Ok(Event::Text(data.freeze()))
    } else {
        Ok(Event::Binary(data.freeze()))
    }
}

/// Parse a close frame's payload (RFC 6455 §5.5.1): empty, or a 2-byte code
/// followed by a UTF-8 reason. Codes that may not be sent (§7.4.1: 1005,
/// 1006, 1015; §7.4.2: below 1000, unassigned 1004 and 1014, 1016–2999,
/// 5000 and up) are a protocol error. tungstenite's `CloseCode::is_allowed`
/// encodes exactly that table.
fn parse_close(payload: &[u8]) -> Result<Event, WsError> {
    match payload {
        [] => Ok(Event::Close {
            code: None,
            reason: String::new(),
        }),
        [_] => Err(WsError::CloseTooShort),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !CloseCode::from(code).is_allowed() {
                return Err(WsError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidCloseReason)?;
            Ok(Event::Close {
                code: Some(code),
                reason: reason.to_owned(),
            })
        }
    }
}

/// How many more bytes the header at the front of `buf` needs (≥ 1), read
/// from its first two bytes (RFC 6455 §5.2). Only for the `needed` hint.
fn missing_header_bytes(buf: &[u8]) -> usize {
    if buf.len() < 2 {
        return 2 - buf.len();
    }
    let ext = match buf[1] & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if buf[1] & 0x80 != 0 { 4 } else { 0 };
    (2 + ext + mask - buf.len()).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: Limits = Limits {
        max_frame_payload: 1 << 20,
        max_message: 1 << 20,
        max_fragments: 64,
    };

    /// Masked "Hello" from RFC 6455 §5.7.
    const MASKED_HELLO: [u8; 11] = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    const UNMASKED_HELLO: [u8; 7] = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
    const RFC_KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn decode_all(role: Role, limits: Limits, bytes: &[u8]) -> Result<Vec<Event>, WsError> {
        let mut dec = Decoder::new(role, limits);
        let mut buf = BytesMut::from(bytes);
        let mut events = Vec::new();
        while let Some(ev) = dec.decode(&mut buf)? {
            events.push(ev);
        }
        assert!(buf.is_empty(), "bytes left over: {buf:?}");
        Ok(events)
    }

    fn one(role: Role, bytes: &[u8]) -> Event {
        let events = decode_all(role, BIG, bytes).expect("decodes");
        assert_eq!(events.len(), 1, "{events:?}");
        events.into_iter().next().unwrap()
    }

    fn err(role: Role, limits: Limits, bytes: &[u8]) -> WsError {
        decode_all(role, limits, bytes).expect_err("must be rejected")
    }

    fn binary(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// A masked frame built by hand (not with our encoder), so decoder
    /// tests do not depend on encoder correctness.
    fn masked_frame(first: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut v = vec![first];
        match payload.len() {
            n @ 0..=125 => v.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(0x80 | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(&key);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        v
    }

    // --- RFC 6455 §5.7 examples -------------------------------------------

    #[test]
    fn rfc_unmasked_text_hello() {
        assert_eq!(
            one(Role::Client, &UNMASKED_HELLO),
            Event::Text(Bytes::from_static(b"Hello"))
        );
    }

    #[test]
    fn rfc_masked_text_hello() {
        assert_eq!(
            one(Role::Server, &MASKED_HELLO),
            Event::Text(Bytes::from_static(b"Hello"))
        );
    }

    #[test]
    fn rfc_fragmented_hello() {
        let bytes = [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
        assert_eq!(
            one(Role::Client, &bytes),
            Event::Text(Bytes::from_static(b"Hello"))
        );

        // Fed frame by frame: the first fragment is consumed, no event yet.
        let mut dec = Decoder::new(Role::Client, BIG);
        let mut buf = BytesMut::from(&bytes[..5]);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
        assert!(dec.in_message());
        buf.extend_from_slice(&bytes[5..]);
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Some(Event::Text(Bytes::from_static(b"Hello")))
        );
        assert!(!dec.in_message());
    }

    #[test]
    fn rfc_ping_and_masked_pong() {
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        assert_eq!(
            one(Role::Client, &ping),
            Event::Ping(Bytes::from_static(b"Hello"))
        );
        let pong = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(
            one(Role::Server, &pong),
            Event::Pong(Bytes::from_static(b"Hello"))
        );
    }

    #[test]
    fn rfc_256_bytes_uses_16_bit_length() {
        let payload = binary(256);
        let mut bytes = vec![0x82, 0x7E, 0x01, 0x00];
        bytes.extend_from_slice(&payload);
        assert_eq!(
            one(Role::Client, &bytes),
            Event::Binary(payload.clone().into())
        );

        let mut out = BytesMut::new();
        encode_frame(&mut out, Role::Server, OpCodeKind::Binary, &payload);
        assert_eq!(&out[..], &bytes[..]);
    }

    #[test]
    fn rfc_64k_uses_64_bit_length() {
        let payload = binary(65536);
        let mut bytes = vec![0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00];
        bytes.extend_from_slice(&payload);
        assert_eq!(
            one(Role::Client, &bytes),
            Event::Binary(payload.clone().into())
        );

        let mut out = BytesMut::new();
        encode_frame(&mut out, Role::Server, OpCodeKind::Binary, &payload);
        assert_eq!(&out[..], &bytes[..]);
    }

    #[test]
    fn encoder_reproduces_rfc_bytes() {
        let mut out = BytesMut::new();
        encode_frame(&mut out, Role::Server, OpCodeKind::Text, b"Hello");
        assert_eq!(&out[..], &UNMASKED_HELLO);

        out.clear();
        encode_raw_frame(&mut out, OpCodeKind::Text, true, b"Hello", Some(RFC_KEY));
        assert_eq!(&out[..], &MASKED_HELLO);

        out.clear();
        encode_raw_frame(&mut out, OpCodeKind::Text, false, b"Hel", None);
        encode_raw_frame(&mut out, OpCodeKind::Continuation, true, b"lo", None);
        assert_eq!(
            &out[..],
            &[0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f]
        );

        out.clear();
        encode_frame(&mut out, Role::Server, OpCodeKind::Ping, b"Hello");
        assert_eq!(&out[..], &[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
    }

    #[test]
    fn header_len_matches_encoder() {
        for len in [0usize, 1, 125, 126, 127, 0xFFFF, 0x1_0000, 0x12_3456] {
            for mask in [None, Some(RFC_KEY)] {
                let mut out = BytesMut::new();
                encode_header(&mut out, OpCodeKind::Binary, true, len, mask);
                assert_eq!(out.len(), header_len(len, mask.is_some()), "len {len}");
            }
        }
        assert_eq!(header_len(125, false), 2);
        assert_eq!(header_len(126, false), 4);
        assert_eq!(header_len(65536, true), 14);
    }

    #[test]
    fn client_frames_are_masked_and_server_decodes_them() {
        let payload = binary(300);
        let mut out = BytesMut::new();
        encode_frame(&mut out, Role::Client, OpCodeKind::Binary, &payload);
        assert_eq!(out[1] & 0x80, 0x80, "mask bit");
        assert_eq!(out.len(), header_len(300, true) + 300);
        assert_ne!(
            &out[8..],
            &payload[..],
            "payload must be masked on the wire"
        );
        assert_eq!(one(Role::Server, &out), Event::Binary(payload.into()));
    }

    #[test]
    fn unfragmented_binary_is_zero_copy() {
        let payload = binary(1000);
        let mut buf = BytesMut::from(&masked_frame(0x82, &payload, RFC_KEY)[..]);
        let base = buf.as_ptr() as usize;
        let head = header_len(1000, true);
        let mut dec = Decoder::new(Role::Server, BIG);
        let Some(Event::Binary(got)) = dec.decode(&mut buf).unwrap() else {
            panic!("expected binary");
        };
        assert_eq!(got, payload);
        assert_eq!(
            got.as_ptr() as usize,
            base + head,
            "payload not split from input"
        );
    }

    #[test]
    fn control_frames_interleave_with_fragments() {
        let mut bytes = masked_frame(0x02, b"ab", RFC_KEY);
        bytes.extend(masked_frame(0x89, b"p", RFC_KEY));
        bytes.extend(masked_frame(0x00, b"cd", [1, 2, 3, 4]));
        bytes.extend(masked_frame(0x8a, b"", RFC_KEY));
        bytes.extend(masked_frame(0x80, b"e", [9, 9, 9, 9]));
        let events = decode_all(Role::Server, BIG, &bytes).unwrap();
        assert_eq!(
            events,
            vec![
                Event::Ping(Bytes::from_static(b"p")),
                Event::Pong(Bytes::new()),
                Event::Binary(Bytes::from_static(b"abcde")),
            ]
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_valid() {
        let text = "h€llo".as_bytes(); // '€' is 3 bytes: split inside it
        let mut bytes = masked_frame(0x01, &text[..2], RFC_KEY);
        bytes.extend(masked_frame(0x80, &text[2..], RFC_KEY));
        assert_eq!(
            one(Role::Server, &bytes),
            Event::Text(Bytes::from_static(text))
        );
    }

    // --- partial input -----------------------------------------------------

    #[test]
    fn partial_input_is_never_consumed() {
        let mut frames: Vec<(Role, Vec<u8>)> = vec![
            (Role::Client, UNMASKED_HELLO.to_vec()),
            (Role::Server, MASKED_HELLO.to_vec()),
            (Role::Server, masked_frame(0x82, &binary(256), RFC_KEY)),
            (
                Role::Server,
                masked_frame(0x88, &[0x03, 0xe8, b'o', b'k'], RFC_KEY),
            ),
        ];
        let mut big = vec![0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00];
        big.extend(binary(65536));
        frames.push((Role::Client, big));

        for (role, frame) in frames {
            // Every split point in the header, and a spread through the
            // payload (all 65 546 points would be slow in debug builds).
            let step = (frame.len() / 512).max(1);
            let points = (0..frame.len().min(16)).chain((16..frame.len()).step_by(step));
            for cut in points {
                let mut dec = Decoder::new(role, BIG);
                let mut buf = BytesMut::from(&frame[..cut]);
                assert_eq!(dec.decode(&mut buf).unwrap(), None, "cut {cut}");
                assert_eq!(buf.len(), cut, "consumed a partial frame at cut {cut}");
                let need = dec.needed();
                assert!(
                    need >= 1 && cut + need <= frame.len(),
                    "cut {cut} need {need}"
                );
                buf.extend_from_slice(&frame[cut..]);
                assert!(dec.decode(&mut buf).unwrap().is_some(), "cut {cut}");
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn needed_is_exact_once_header_is_known() {
        let frame = masked_frame(0x82, &binary(300), RFC_KEY);
        let mut dec = Decoder::new(Role::Server, BIG);
        let mut buf = BytesMut::from(&frame[..20]);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert_eq!(dec.needed(), frame.len() - 20);
        let mut buf = BytesMut::from(&frame[..1]);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert_eq!(dec.needed(), 1);
        let mut buf = BytesMut::from(&frame[..3]);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert_eq!(dec.needed(), 8 - 3, "2 + 2 (16-bit len) + 4 (key)");
    }

    // --- violations and their close codes ------------------------------------

    fn code_of(role: Role, limits: Limits, bytes: &[u8]) -> u16 {
        err(role, limits, bytes).close_code()
    }

    #[test]
    fn reserved_bits_are_1002() {
        for rsv in [0x40, 0x20, 0x10] {
            let e = err(Role::Server, BIG, &masked_frame(0x82 | rsv, b"x", RFC_KEY));
            assert!(matches!(e, WsError::ReservedBits(_)), "{e:?}");
            assert_eq!(e.close_code(), 1002);
        }
    }

    #[test]
    fn unknown_opcodes_are_1002() {
        for op in (0x3..=0x7).chain(0xB..=0xF) {
            let e = err(Role::Server, BIG, &masked_frame(0x80 | op, b"", RFC_KEY));
            assert!(matches!(e, WsError::UnknownOpcode(o) if o == op), "{e:?}");
            assert_eq!(e.close_code(), 1002);
        }
    }

    #[test]
    fn masking_must_match_role() {
        let e = err(Role::Server, BIG, &UNMASKED_HELLO);
        assert!(matches!(e, WsError::UnmaskedFrame));
        assert_eq!(e.close_code(), 1002);
        let e = err(Role::Client, BIG, &MASKED_HELLO);
        assert!(matches!(e, WsError::MaskedFrame));
        assert_eq!(e.close_code(), 1002);
    }

    #[test]
    fn control_frame_rules_are_1002() {
        let e = err(Role::Server, BIG, &masked_frame(0x89, &[0; 126], RFC_KEY));
        assert!(matches!(e, WsError::ControlTooLong(126)), "{e:?}");
        assert_eq!(e.close_code(), 1002);
        // 125 is still fine.
        assert!(matches!(
            one(Role::Server, &masked_frame(0x89, &[0; 125], RFC_KEY)),
            Event::Ping(_)
        ));
        let e = err(Role::Server, BIG, &masked_frame(0x09, b"x", RFC_KEY));
        assert!(matches!(e, WsError::FragmentedControl), "{e:?}");
        assert_eq!(e.close_code(), 1002);
    }

    #[test]
    fn oversized_control_fails_before_payload_arrives() {
        // Header announces 200 bytes of ping; no payload yet.
        let mut buf = BytesMut::from(&[0x89u8, 0xFE, 0x00, 0xC8, 1, 2, 3, 4][..]);
        let e = Decoder::new(Role::Server, BIG)
            .decode(&mut buf)
            .unwrap_err();
        assert_eq!(e.close_code(), 1002);
    }

    #[test]
    fn continuation_rules_are_1002() {
        let e = err(Role::Server, BIG, &masked_frame(0x80, b"x", RFC_KEY));
        assert!(matches!(e, WsError::UnexpectedContinuation), "{e:?}");
        assert_eq!(e.close_code(), 1002);

        let mut bytes = masked_frame(0x02, b"a", RFC_KEY);
        bytes.extend(masked_frame(0x82, b"b", RFC_KEY));
        let e = err(Role::Server, BIG, &bytes);
        assert!(matches!(e, WsError::ExpectedContinuation), "{e:?}");
        assert_eq!(e.close_code(), 1002);
    }

    #[test]
    fn msb_of_64_bit_length_is_1002() {
        let bytes = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4];
        let e = err(Role::Server, BIG, &bytes);
        assert!(matches!(e, WsError::InvalidLength), "{e:?}");
        assert_eq!(e.close_code(), 1002);
    }

    #[test]
    fn frame_too_large_is_1009_before_payload() {
        let limits = Limits {
            max_frame_payload: 100,
            ..BIG
        };
        // Only the header is present: the decoder must not wait for 101 bytes.
        let mut buf = BytesMut::from(&[0x82u8, 0xE5, 1, 2, 3, 4][..]);
        let e = Decoder::new(Role::Server, limits)
            .decode(&mut buf)
            .unwrap_err();
        assert!(
            matches!(
                e,
                WsError::FrameTooLarge {
                    len: 101,
                    limit: 100
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.close_code(), 1009);
        assert!(decode_all(
            Role::Server,
            limits,
            &masked_frame(0x82, &[0; 100], RFC_KEY)
        )
        .is_ok());
    }

    #[test]
    fn message_too_large_is_1009() {
        let limits = Limits {
            max_frame_payload: 100,
            max_message: 150,
            max_fragments: 10,
        };
        let mut bytes = masked_frame(0x02, &[0; 100], RFC_KEY);
        bytes.extend(masked_frame(0x80, &[0; 50], RFC_KEY));
        assert!(decode_all(Role::Server, limits, &bytes).is_ok());
        let mut bytes = masked_frame(0x02, &[0; 100], RFC_KEY);
        bytes.extend(masked_frame(0x80, &[0; 51], RFC_KEY));
        let e = err(Role::Server, limits, &bytes);
        assert!(
            matches!(
                e,
                WsError::MessageTooLarge {
                    len: 151,
                    limit: 150
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.close_code(), 1009);
        // A single frame above max_message but within max_frame_payload.
        let limits = Limits {
            max_message: 10,
            ..limits
        };
        assert_eq!(
            code_of(Role::Server, limits, &masked_frame(0x82, &[0; 11], RFC_KEY)),
            1009
        );
    }

    #[test]
    fn too_many_fragments_is_1008() {
        let limits = Limits {
            max_fragments: 3,
            ..BIG
        };
        let frames = |n: usize| {
            let mut bytes = masked_frame(0x02, b"a", RFC_KEY);
            for _ in 1..n - 1 {
                bytes.extend(masked_frame(0x00, b"b", RFC_KEY));
            }
            bytes.extend(masked_frame(0x80, b"c", RFC_KEY));
            bytes
        };
        assert!(decode_all(Role::Server, limits, &frames(3)).is_ok());
        let e = err(Role::Server, limits, &frames(4));
        assert!(matches!(e, WsError::TooManyFragments { limit: 3 }), "{e:?}");
        assert_eq!(e.close_code(), 1008);
    }

    #[test]
    fn invalid_utf8_text_is_1007() {
        let e = err(
            Role::Server,
            BIG,
            &masked_frame(0x81, &[0xff, 0xfe], RFC_KEY),
        );
        assert!(matches!(e, WsError::InvalidUtf8), "{e:?}");
        assert_eq!(e.close_code(), 1007);
        // Fragmented, ending in the middle of a code point.
        let mut bytes = masked_frame(0x01, b"ok", RFC_KEY);
        bytes.extend(masked_frame(0x80, &"€".as_bytes()[..2], RFC_KEY));
        assert_eq!(code_of(Role::Server, BIG, &bytes), 1007);
        // Binary is not checked.
        assert!(matches!(
            one(Role::Server, &masked_frame(0x82, &[0xff], RFC_KEY)),
            Event::Binary(_)
        ));
    }

    #[test]
    fn close_frames() {
        assert_eq!(
            one(Role::Server, &masked_frame(0x88, b"", RFC_KEY)),
            Event::Close {
                code: None,
                reason: String::new()
            }
        );
        assert_eq!(
            one(Role::Server, &masked_frame(0x88, b"\x03\xe8bye", RFC_KEY)),
            Event::Close {
                code: Some(1000),
                reason: "bye".into()
            }
        );
        for ok in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999,
        ] {
            let ev = one(
                Role::Server,
                &masked_frame(0x88, &ok.to_be_bytes(), RFC_KEY),
            );
            assert!(matches!(ev, Event::Close { code: Some(c), .. } if c == ok));
        }

        let e = err(Role::Server, BIG, &masked_frame(0x88, &[0x03], RFC_KEY));
        assert!(matches!(e, WsError::CloseTooShort), "{e:?}");
        assert_eq!(e.close_code(), 1002);
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 0xFFFF] {
            let e = err(
                Role::Server,
                BIG,
                &masked_frame(0x88, &bad.to_be_bytes(), RFC_KEY),
            );
            assert!(
                matches!(e, WsError::InvalidCloseCode(c) if c == bad),
                "{bad}: {e:?}"
            );
            assert_eq!(e.close_code(), 1002);
        }
        let e = err(
            Role::Server,
            BIG,
            &masked_frame(0x88, b"\x03\xe8\xff", RFC_KEY),
        );
        assert!(matches!(e, WsError::InvalidCloseReason), "{e:?}");
        assert_eq!(e.close_code(), 1002);
    }

    #[test]
    fn encode_close_round_trips_and_truncates() {
        let mut out = BytesMut::new();
        encode_close(&mut out, Role::Client, 1001, "going away");
        assert_eq!(
            one(Role::Server, &out),
            Event::Close {
                code: Some(1001),
                reason: "going away".into()
            }
        );
        // 200 bytes of 2-byte chars: cut to ≤ 123 bytes on a char boundary.
        let long = "é".repeat(100);
        out.clear();
        encode_close(&mut out, Role::Server, 1000, &long);
        assert_eq!(out[1] as usize, 2 + 122);
        let Event::Close { reason, .. } = one(Role::Client, &out) else {
            panic!("expected close");
        };
        assert_eq!(reason, "é".repeat(61));
    }

    #[test]
    fn apply_mask_matches_bytewise_xor() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in 0..40 {
            let data = binary(len);
            let mut fast = data.clone();
            apply_mask(&mut fast, key);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert_eq!(fast, slow, "len {len}");
        }
        let mut hello = MASKED_HELLO[6..].to_vec();
        apply_mask(&mut hello, RFC_KEY);
        assert_eq!(hello, b"Hello");
    }
}
