//! Errors of the HTTP/1.1 head parsers and the chunked decoder.
//!
//! Every variant is fatal for the connection it came from: after a framing
//! error the byte stream can no longer be trusted (RFC 9112 §11.2, request
//! smuggling), so the caller answers with [`HeadError::status`] and closes.
//! For a *response* head or body (the receiver's client talking to the local
//! app) the caller maps any of these to 502 instead (RFC 9112 §6.3 item 5).
//!
//! The variants carry no heap data so they are cheap to return on the hot
//! path and can be compared in tests; `reason()` is the short text for logs.

/// Why a request or response head was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// A LF not preceded by CR inside the head (RFC 9112 §2.2).
    #[error("{}", self.reason())]
    BareLf,
    /// A CR not followed by LF inside the head (RFC 9112 §2.2).
    #[error("{}", self.reason())]
    BareCr,
    /// A line of the head starts with whitespace: obs-fold, or whitespace
    /// between the start-line and the first field (RFC 9112 §2.2, §5.2).
    #[error("{}", self.reason())]
    ObsFold,
    /// Whitespace between a field name and its colon (RFC 9112 §5.1).
    #[error("{}", self.reason())]
    SpaceBeforeColon,
    /// The tokeniser refused the head; the text says which part.
    #[error("{0}")]
    Malformed(&'static str),
    /// The request-target is neither origin-form, absolute-form with an
    /// `http`/`https` scheme, nor `*` for OPTIONS (RFC 9112 §3.2).
    #[error("{0}")]
    InvalidTarget(&'static str),
    /// Both Content-Length and Transfer-Encoding in a request
    /// (RFC 9112 §6.1, §6.3 item 3; the classic smuggling vector).
    #[error("{}", self.reason())]
    ContentLengthWithTransferEncoding,
    /// A Content-Length value that is not `1*DIGIT` or overflows u64
    /// (RFC 9110 §8.6, RFC 9112 §6.3 item 5).
    #[error("{}", self.reason())]
    InvalidContentLength,
    /// Several Content-Length values that differ (RFC 9110 §8.6).
    #[error("{}", self.reason())]
    DifferingContentLength,
    /// The final transfer coding is not `chunked` (RFC 9112 §6.3 item 4).
    #[error("{}", self.reason())]
    ChunkedNotLast,
    /// `chunked` applied more than once (RFC 9112 §6.1).
    #[error("{}", self.reason())]
    ChunkedTwice,
    /// A transfer coding other than `chunked` before a final `chunked`
    /// (e.g. `gzip, chunked`). The framing is sound, but the gateway
    /// decodes no coding besides chunked, and it strips Transfer-Encoding
    /// as hop-by-hop, so forwarding would hand the app gzip bytes with
    /// nothing saying so. RFC 9112 §6.1: a server SHOULD answer a transfer
    /// coding it does not understand with 501; the body is not read, so the
    /// connection is closed as after any head error.
    #[error("{}", self.reason())]
    UnsupportedTransferCoding,
    /// Transfer-Encoding in an HTTP/1.0 message (RFC 9112 §6.1: framing
    /// must be treated as faulty).
    #[error("{}", self.reason())]
    TransferEncodingInHttp10,
    /// HTTP/1.1 request without Host (RFC 9112 §3.2).
    #[error("{}", self.reason())]
    MissingHost,
    /// More than one Host field (RFC 9112 §3.2).
    #[error("{}", self.reason())]
    MultipleHost,
    /// A Host value (or absolute-form authority) outside the
    /// `uri-host [ ":" port ]` alphabet (RFC 9110 §7.2, RFC 3986 §3.2).
    #[error("{}", self.reason())]
    InvalidHost,
    /// A response status outside 100..=599 (RFC 9110 §15).
    #[error("{}", self.reason())]
    InvalidStatus,
    /// The request-line is longer than `Limits::max_request_line`.
    #[error("{}", self.reason())]
    UriTooLong,
    /// The head is longer than `Limits::max_head`.
    #[error("{}", self.reason())]
    HeadTooLarge,
    /// More fields than `Limits::max_headers`.
    #[error("{}", self.reason())]
    TooManyHeaders,
}

impl HeadError {
    /// The status the gateway answers a *request* with (RFC 9112 §3: 400
    /// for a malformed request, RFC 9110 §15.5.15 414, RFC 6585 §5 431,
    /// RFC 9112 §6.1 501 for a transfer coding it does not implement).
    pub fn status(&self) -> u16 {
        match self {
            HeadError::UriTooLong => 414,
            HeadError::UnsupportedTransferCoding => 501,
            HeadError::HeadTooLarge | HeadError::TooManyHeaders => 431,
            _ => 400,
        }
    }

    /// Short text for the log line.
    pub fn reason(&self) -> &'static str {
        match self {
            HeadError::BareLf => "bare LF in head",
            HeadError::BareCr => "bare CR in head",
            HeadError::ObsFold => "line starts with whitespace (obs-fold)",
            HeadError::SpaceBeforeColon => "whitespace between field name and colon",
            HeadError::Malformed(r) | HeadError::InvalidTarget(r) => r,
            HeadError::ContentLengthWithTransferEncoding => {
                "both Content-Length and Transfer-Encoding"
            }
            HeadError::InvalidContentLength => "invalid Content-Length",
            HeadError::DifferingContentLength => "differing Content-Length values",
            HeadError::ChunkedNotLast => "final transfer coding is not chunked",
            HeadError::ChunkedTwice => "chunked applied more than once",
            HeadError::UnsupportedTransferCoding => "unsupported transfer coding",
            HeadError::TransferEncodingInHttp10 => "Transfer-Encoding in HTTP/1.0",
            HeadError::MissingHost => "missing Host",
            HeadError::MultipleHost => "more than one Host",
            HeadError::InvalidHost => "invalid Host",
            HeadError::InvalidStatus => "status code outside 100..=599",
            HeadError::UriTooLong => "request-line too long",
            HeadError::HeadTooLarge => "head too large",
            HeadError::TooManyHeaders => "too many header fields",
        }
    }
}

/// Why a chunked body was refused (RFC 9112 §7.1). Always answered with 400
/// on a request body (502 on a response body) and the connection closed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ChunkedError {
    /// The chunk-size line does not start with a hex digit, or is followed
    /// by something other than an extension or CRLF.
    #[error("{}", self.reason())]
    InvalidSize,
    /// More than 16 hex digits: cannot fit a u64.
    #[error("{}", self.reason())]
    SizeOverflow,
    /// A malformed chunk extension.
    #[error("{}", self.reason())]
    InvalidExtension,
    /// Chunk data not followed by CRLF.
    #[error("{}", self.reason())]
    MissingDataCrlf,
    /// A LF without CR or a CR without LF in a size line or trailer.
    #[error("{}", self.reason())]
    BareLineEnding,
    /// A control byte inside a trailer field line.
    #[error("{}", self.reason())]
    InvalidTrailer,
    /// Extensions and trailers together exceed the decoder's budget.
    #[error("{}", self.reason())]
    ExtensionsOrTrailersTooLarge,
}

impl ChunkedError {
    /// Status for a request body; a response body maps to 502 instead.
    pub fn status(&self) -> u16 {
        400
    }

    /// Short text for the log line.
    pub fn reason(&self) -> &'static str {
        match self {
            ChunkedError::InvalidSize => "invalid chunk size",
            ChunkedError::SizeOverflow => "chunk size overflow",
            ChunkedError::InvalidExtension => "invalid chunk extension",
            ChunkedError::MissingDataCrlf => "chunk data not followed by CRLF",
            ChunkedError::BareLineEnding => "bare CR or LF in chunked framing",
            ChunkedError::InvalidTrailer => "invalid trailer field",
            ChunkedError::ExtensionsOrTrailersTooLarge => "chunk extensions or trailers too large",
        }
    }
}
