//! Error types of the ANPX codec, one enum per layer: [`DecodeError`] for a
//! single frame (PROTOCOL.md §2–3), [`MetaError`] for the meta JSON (§4, §7)
//! and [`ReassemblyError`] for a chunked message (§5).
//!
//! Each has `kind()`: a short, stable name. The frame-level names are the
//! ones used by `anpx-vectors/vectors.json`, so tests compare against the
//! reference data, and callers can log or count by kind without matching on
//! every field.

use thiserror::Error;

/// Why one WebSocket binary message is not a valid ANPX frame.
///
/// Every variant is fatal for that frame only; the request it belongs to is
/// unknown (the request_id lives inside the body that failed to decode).
#[derive(Error, Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer than the 24 header bytes.
    #[error("frame too short: {len} bytes, header needs 24")]
    TooShort { len: usize },
    /// Bytes 0..4 are not `ANPX`.
    #[error("bad magic {found:02x?}, expected \"ANPX\"")]
    BadMagic { found: [u8; 4] },
    /// Byte 4 is not 1.
    #[error("unsupported version {0}")]
    BadVersion(u8),
    /// CRC-32 of bytes 0..12 does not match bytes 12..16.
    #[error("header crc mismatch: header says {expected:#010x}, computed {computed:#010x}")]
    HeaderCrc { expected: u32, computed: u32 },
    /// `total_len` differs from the message length (truncated or trailing bytes).
    #[error("total_len {declared} does not match message length {actual}")]
    TotalLength { declared: u32, actual: usize },
    /// CRC-32 of bytes 24..total_len does not match bytes 16..20.
    #[error("body crc mismatch: header says {expected:#010x}, computed {computed:#010x}")]
    BodyCrc { expected: u32, computed: u32 },
    /// A TLV's 5-byte head or its value runs past the end of the frame.
    #[error("tlv tag {tag:#04x} at offset {offset} runs past the end of the frame")]
    TlvLength { tag: u8, offset: usize },
    /// Byte 5 is none of 0x01, 0x02, 0xFF.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// A known TLV appears twice in one frame; which copy wins would be a
    /// guess, so the frame is refused.
    #[error("tlv tag {0:#04x} appears twice")]
    DuplicateTag(u8),
    /// A known TLV whose value has the wrong shape.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        field: &'static str,
        reason: &'static str,
    },
}

impl DecodeError {
    /// Short stable name; equals `expect.error` of the invalid vectors.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::TooShort { .. } => "too short",
            DecodeError::BadMagic { .. } => "magic",
            DecodeError::BadVersion(_) => "version",
            DecodeError::HeaderCrc { .. } => "header crc",
            DecodeError::TotalLength { .. } => "total length",
            DecodeError::BodyCrc { .. } => "body crc",
            DecodeError::TlvLength { .. } => "tlv length",
            DecodeError::UnknownFrameType(_) => "frame type",
            DecodeError::DuplicateTag(_) => "duplicate tag",
            DecodeError::InvalidField { .. } => "invalid field",
        }
    }
}

/// Why a meta JSON document (PROTOCOL.md §4, §7) was refused.
#[derive(Error, Debug, Clone, PartialEq, Eq)]
pub enum MetaError {
    /// Not JSON, or JSON of the wrong shape. Holds serde_json's message
    /// (serde_json::Error is neither Clone nor Eq).
    #[error("meta json: {0}")]
    Json(String),
    /// `status` outside 100..=999.
    #[error("status {0} outside 100..=999")]
    Status(u64),
    /// A binary meta (`binmeta`, PROTOCOL.md §7.5) that does not parse.
    #[error("binary meta: {0}")]
    Binary(&'static str),
}

impl MetaError {
    pub fn kind(&self) -> &'static str {
        match self {
            MetaError::Json(_) => "meta json",
            MetaError::Status(_) => "meta status",
            MetaError::Binary(_) => "meta binary",
        }
    }
}

impl From<serde_json::Error> for MetaError {
    fn from(e: serde_json::Error) -> Self {
        MetaError::Json(e.to_string())
    }
}

/// Why a frame could not be added to a message (PROTOCOL.md §5).
///
/// Every variant except `Decode` and `MissingRequestId` names the request it
/// belongs to: the caller fails just that request, the tunnel stays up. The
/// reassembler has already dropped that request's partial state.
#[derive(Error, Debug, Clone, PartialEq, Eq)]
pub enum ReassemblyError {
    /// The frame itself is malformed; its request is unknown.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A frame without a request_id TLV cannot be matched to anything.
    #[error("frame has no request_id")]
    MissingRequestId,
    #[error("request {request_id}: chunk {idx} received twice")]
    DuplicateChunk { request_id: String, idx: u32 },
    /// `idx >= chunk_tot`, or past the chunk that said `final_chunk = 1`.
    #[error("request {request_id}: chunk {idx} out of range (total {total})")]
    ChunkOutOfRange {
        request_id: String,
        idx: u32,
        total: u32,
    },
    #[error("request {request_id}: body exceeds {limit} bytes")]
    TooLarge { request_id: String, limit: usize },
    #[error("request {request_id}: more than {limit} messages being reassembled")]
    TooManyAssemblies { request_id: String, limit: usize },
    /// A complete request/response carried no http_meta/resp_meta.
    #[error("request {request_id}: no meta in message")]
    MissingMeta { request_id: String },
    #[error("request {request_id}: {source}")]
    BadMeta {
        request_id: String,
        source: MetaError,
    },
    /// Frames of one message disagree (type, chunk_tot, meta twice, ...).
    #[error("request {request_id}: inconsistent frames: {what}")]
    Inconsistent {
        request_id: String,
        what: &'static str,
    },
}

impl ReassemblyError {
    /// Short stable name; a decode error keeps its frame-level kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ReassemblyError::Decode(e) => e.kind(),
            ReassemblyError::MissingRequestId => "missing request_id",
            ReassemblyError::DuplicateChunk { .. } => "duplicate chunk",
            ReassemblyError::ChunkOutOfRange { .. } => "chunk out of range",
            ReassemblyError::TooLarge { .. } => "too large",
            ReassemblyError::TooManyAssemblies { .. } => "too many assemblies",
            ReassemblyError::MissingMeta { .. } => "missing meta",
            ReassemblyError::BadMeta { source, .. } => source.kind(),
            ReassemblyError::Inconsistent { .. } => "inconsistent",
        }
    }

    /// The request this error belongs to, when the frame got far enough to
    /// say: the caller fails that request only.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            ReassemblyError::Decode(_) | ReassemblyError::MissingRequestId => None,
            ReassemblyError::DuplicateChunk { request_id, .. }
            | ReassemblyError::ChunkOutOfRange { request_id, .. }
            | ReassemblyError::TooLarge { request_id, .. }
            | ReassemblyError::TooManyAssemblies { request_id, .. }
            | ReassemblyError::MissingMeta { request_id }
            | ReassemblyError::BadMeta { request_id, .. }
            | ReassemblyError::Inconsistent { request_id, .. } => Some(request_id),
        }
    }
}
