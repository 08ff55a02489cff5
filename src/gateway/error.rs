//! Why a proxied request failed, and the **one** function that turns a
//! failure into the status the client sees (DESIGN.md, status table).

use std::fmt::Write as _;

use crate::http::HeadError;

/// A failed proxy attempt. Variants say which side failed: the client
/// (4xx), the route/tunnel state (404/503), or the receiver (502/504).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("malformed request head: {0}")]
    Head(#[from] HeadError),
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("request head not received within header_timeout")]
    HeadTimeout,
    /// The upload stalled (`request_body_timeout`) or crawled
    /// (`request_body_min_rate`).
    #[error("{}", match .0 {
        super::pace::Stall::Gap => "request body stalled: no bytes for request_body_timeout",
        super::pace::Stall::Rate => "request body slower than request_body_min_rate",
    })]
    BodyTimeout(super::pace::Stall),
    #[error("no route owns path {0}")]
    NoRoute(String),
    #[error("body longer than max_body_size ({0} bytes)")]
    BodyTooLarge(usize),
    #[error("route owned by `{0}` has no tunnel connected")]
    NoTunnel(String),
    #[error("tunnel in-flight limit reached ({0})")]
    TunnelBusy(usize),
    #[error("upgrade requests are not supported on this path")]
    UpgradeRefused,
    #[error("receiver reported an error: {0}")]
    Receiver(String),
    #[error("tunnel closed before the response arrived")]
    TunnelClosed,
    #[error("receiver sent an invalid response: {0}")]
    BadResponse(String),
    #[error("no response within timeout")]
    Timeout,
}

/// What the client is told about a [`ProxyError`].
#[derive(Debug, Clone)]
pub struct ErrorReply {
    pub status: u16,
    /// JSON body naming the reason.
    pub body: String,
    pub retry_after: Option<u32>,
    /// Close the client connection after this reply.
    pub close: bool,
}

/// The one mapping from failures to statuses.
pub fn error_reply(err: &ProxyError) -> ErrorReply {
    let (status, retry_after, close) = match err {
        ProxyError::Head(h) => (h.status(), None, true),
        ProxyError::BadRequest(_) => (400, None, true),
        ProxyError::HeadTimeout | ProxyError::BodyTimeout(_) => (408, None, true),
        ProxyError::NoRoute(_) => (404, None, false),
        ProxyError::BodyTooLarge(_) => (413, None, true),
        ProxyError::NoTunnel(_) => (503, Some(5), false),
        ProxyError::TunnelBusy(_) => (503, Some(1), false),
        ProxyError::UpgradeRefused => (501, None, true),
        ProxyError::Receiver(_) | ProxyError::TunnelClosed | ProxyError::BadResponse(_) => {
            (502, None, false)
        }
        ProxyError::Timeout => (504, None, false),
    };
    let mut body = String::with_capacity(96);
    let _ = write!(body, "{{\"error\":{},", json_str(error_kind(err)));
    let _ = write!(body, "\"message\":{}", json_str(&err.to_string()));
    if let ProxyError::NoRoute(p) = err {
        let _ = write!(body, ",\"path\":{}", json_str(p));
    }
    body.push('}');
    ErrorReply {
        status,
        body,
        retry_after,
        close,
    }
}

/// A short, stable name for logs, metrics and the JSON body.
pub fn error_kind(err: &ProxyError) -> &'static str {
    match err {
        ProxyError::Head(_) | ProxyError::BadRequest(_) => "bad_request",
        ProxyError::HeadTimeout | ProxyError::BodyTimeout(_) => "request_timeout",
        ProxyError::NoRoute(_) => "no_route",
        ProxyError::BodyTooLarge(_) => "body_too_large",
        ProxyError::NoTunnel(_) => "no_tunnel",
        ProxyError::TunnelBusy(_) => "tunnel_busy",
        ProxyError::UpgradeRefused => "upgrade_refused",
        ProxyError::Receiver(_) => "receiver_error",
        ProxyError::TunnelClosed => "tunnel_closed",
        ProxyError::BadResponse(_) => "bad_response",
        ProxyError::Timeout => "timeout",
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let cases: Vec<(ProxyError, u16)> = vec![
            (ProxyError::BadRequest("x"), 400),
            (ProxyError::NoRoute("/x".into()), 404),
            (ProxyError::BodyTooLarge(1), 413),
            (ProxyError::NoTunnel("a".into()), 503),
            (ProxyError::TunnelBusy(1), 503),
            (ProxyError::Receiver("boom".into()), 502),
            (ProxyError::TunnelClosed, 502),
            (ProxyError::Timeout, 504),
        ];
        for (e, s) in cases {
            let r = error_reply(&e);
            assert_eq!(r.status, s, "{e}");
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(v["error"], error_kind(&e));
        }
        assert!(error_reply(&ProxyError::NoTunnel("a".into()))
            .retry_after
            .is_some());
        let r = error_reply(&ProxyError::NoRoute("/nope/\"x".into()));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["path"], "/nope/\"x");
    }
}
