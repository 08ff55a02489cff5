//! Errors of the WebSocket layer: one enum for framing ([`WsError`]) and one
//! for the opening handshake ([`HandshakeError`]).
//!
//! Every [`WsError`] is fatal for the connection: RFC 6455 §7.1.7 says an
//! endpoint that receives an invalid frame must *fail the WebSocket
//! connection*, so there is no "recoverable" variant. The only decision the
//! IO loop has to make is which close code to send, and that lives in one
//! place: [`WsError::close_code`] (codes from RFC 6455 §7.4.1).

/// Close code 1002: protocol error (RFC 6455 §7.4.1).
pub const CLOSE_PROTOCOL: u16 = 1002;
/// Close code 1007: data not consistent with the message type, e.g.
/// non-UTF-8 text (RFC 6455 §7.4.1, §8.1).
pub const CLOSE_INVALID_DATA: u16 = 1007;
/// Close code 1008: policy violation (RFC 6455 §7.4.1).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code 1009: message too big to process (RFC 6455 §7.4.1).
pub const CLOSE_TOO_BIG: u16 = 1009;

/// A frame or message the decoder refuses. See [`WsError::close_code`].
#[derive(thiserror::Error, Debug)]
pub enum WsError {
    /// RSV1..3 set although no extension was negotiated (RFC 6455 §5.2).
    #[error("reserved bits set in frame header (byte 0 = {0:#04x})")]
    ReservedBits(u8),
    /// Opcode 0x3..0x7 or 0xB..0xF (RFC 6455 §5.2, §11.8).
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// Any other header error reported by tungstenite's parser. With an
    /// in-memory cursor only the opcode check can fail today; this variant
    /// keeps a future tungstenite error from turning into a panic.
    #[error("invalid frame header: {0}")]
    Header(#[source] tungstenite::Error),
    /// A client sent an unmasked frame (RFC 6455 §5.1: the server MUST fail
    /// the connection).
    #[error("unmasked frame received by a server")]
    UnmaskedFrame,
    /// A server sent a masked frame (RFC 6455 §5.1: the client MUST fail the
    /// connection).
    #[error("masked frame received by a client")]
    MaskedFrame,
    /// 64-bit payload length with the most significant bit set (RFC 6455 §5.2).
    #[error("64-bit payload length has its most significant bit set")]
    InvalidLength,
    /// Control frame with more than 125 bytes of payload (RFC 6455 §5.5).
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlTooLong(u64),
    /// Control frame with FIN clear (RFC 6455 §5.5: control frames MUST NOT
    /// be fragmented).
    #[error("fragmented control frame")]
    FragmentedControl,
    /// Continuation frame with no fragmented message open (RFC 6455 §5.4).
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    /// Text/binary frame while a fragmented message is still open (RFC 6455
    /// §5.4: fragments of one message MUST NOT be interleaved with another).
    #[error("new data frame while a fragmented message is open")]
    ExpectedContinuation,
    /// One frame's payload is above [`Limits::max_frame_payload`](super::Limits).
    #[error("frame payload of {len} bytes exceeds the limit of {limit}")]
    FrameTooLarge {
        /// Announced payload length.
        len: u64,
        /// The configured limit.
        limit: usize,
    },
    /// The (reassembled) message would exceed [`Limits::max_message`](super::Limits).
    #[error("message of at least {len} bytes exceeds the limit of {limit}")]
    MessageTooLarge {
        /// Bytes the message would hold with this frame.
        len: u64,
        /// The configured limit.
        limit: usize,
    },
    /// The message has more fragments than [`Limits::max_fragments`](super::Limits).
    #[error("message has more than {limit} fragments")]
    TooManyFragments {
        /// The configured limit.
        limit: usize,
    },
    /// A text message is not valid UTF-8 (RFC 6455 §8.1).
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// Close frame with a 1-byte payload: a code needs 2 bytes (RFC 6455 §5.5.1).
    #[error("close frame payload of 1 byte")]
    CloseTooShort,
    /// Close code that may not appear on the wire (RFC 6455 §7.4.1, §7.4.2).
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// Close reason that is not UTF-8 (RFC 6455 §5.5.1).
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
}

impl WsError {
    /// The close code to send when failing the connection because of this
    /// error (RFC 6455 §7.4.1). This is the only place that mapping lives.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::FrameTooLarge { .. } | WsError::MessageTooLarge { .. } => CLOSE_TOO_BIG,
            // A fragment count is not a size: the message may be small but
            // split into many tiny frames to burn CPU; that is policy (1008).
            WsError::TooManyFragments { .. } => CLOSE_POLICY,
            WsError::InvalidUtf8 => CLOSE_INVALID_DATA,
            // The brief fixes 1002 for a non-UTF-8 close reason (a malformed
            // control frame), unlike a text message's 1007.
            WsError::ReservedBits(_)
            | WsError::UnknownOpcode(_)
            | WsError::Header(_)
            | WsError::UnmaskedFrame
            | WsError::MaskedFrame
            | WsError::InvalidLength
            | WsError::ControlTooLong(_)
            | WsError::FragmentedControl
            | WsError::UnexpectedContinuation
            | WsError::ExpectedContinuation
            | WsError::CloseTooShort
            | WsError::InvalidCloseCode(_)
            | WsError::InvalidCloseReason => CLOSE_PROTOCOL,
        }
    }
}

/// The opening handshake (RFC 6455 §4) failed, on either side.
#[derive(thiserror::Error, Debug)]
pub enum HandshakeError {
    /// The upgrade request's method is not GET (RFC 6455 §4.2.1 item 1).
    #[error("upgrade request method is {0:?}, not GET")]
    MethodNotGet(String),
    /// A header the handshake requires is absent.
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// `Upgrade` does not carry the `websocket` token (RFC 6455 §4.2.1 item 3, §4.1).
    #[error("Upgrade header does not contain the websocket token")]
    BadUpgrade,
    /// `Connection` does not carry the `upgrade` token (RFC 6455 §4.2.1 item 4, §4.1).
    #[error("Connection header does not contain the upgrade token")]
    BadConnection,
    /// `Sec-WebSocket-Version` is not 13 (RFC 6455 §4.2.1 item 6).
    #[error("unsupported Sec-WebSocket-Version (only 13 is spoken)")]
    BadVersion,
    /// `Sec-WebSocket-Key` is repeated or not base64 of 16 bytes (RFC 6455 §4.2.1 item 5).
    #[error("Sec-WebSocket-Key is not the base64 encoding of 16 bytes")]
    BadKey,
    /// The server's response head is not valid HTTP/1.1.
    #[error("malformed HTTP response head: {0}")]
    Malformed(#[from] httparse::Error),
    /// The server's response head grew past [`MAX_RESPONSE_HEAD`](super::handshake::MAX_RESPONSE_HEAD)
    /// without ending.
    #[error("HTTP response head exceeds {0} bytes")]
    HeadTooLarge(usize),
    /// `Content-Length` of a refusal response is not a number, or repeated
    /// with different values (RFC 9112 §6.3).
    #[error("invalid Content-Length in HTTP response")]
    BadContentLength,
    /// A 101 whose `Sec-WebSocket-Accept` does not match our key (RFC 6455 §4.1).
    #[error("Sec-WebSocket-Accept does not match the key sent")]
    WrongAccept,
}

impl HandshakeError {
    /// The HTTP status to answer with when this error was found in an
    /// upgrade *request* (server side). `None` for errors that only a
    /// server's response can cause (client side: there is nobody to answer,
    /// and the IO loop logs and reconnects instead).
    ///
    /// RFC 6455 §4.2.1: a malformed request gets 400; §4.2.2 / §4.4: a
    /// version we do not speak gets 426 with `Sec-WebSocket-Version: 13`.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            HandshakeError::MethodNotGet(_) => Some(405),
            HandshakeError::BadVersion => Some(426),
            HandshakeError::MissingHeader(_)
            | HandshakeError::BadUpgrade
            | HandshakeError::BadConnection
            | HandshakeError::BadKey => Some(400),
            HandshakeError::Malformed(_)
            | HandshakeError::HeadTooLarge(_)
            | HandshakeError::BadContentLength
            | HandshakeError::WrongAccept => None,
        }
    }
}
