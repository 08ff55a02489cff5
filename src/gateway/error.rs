//! Why a proxied request failed, and the **one** function that turns a
//! failure into the status the client sees (DESIGN.md, status table).
//!
//! What the client reads is not what the log reads. A 4xx body says what
//! was wrong with the client's own request; a 5xx body says only which
//! kind of failure it was, in words fixed per status ([`public_message`]):
//! the detail (an upstream address, an OS error, a host name, an identity)
//! is for the gateway's log and access log, never for the public.

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
    /// A `[[gateway.rate_limits]]` bucket is empty (429).
    #[error("rate limit exceeded: {0}")]
    RateLimited(Box<super::ratelimit::Limited>),
    /// The identity's in-flight places and queue are full, or the wait
    /// in its queue passed `queue_timeout` (503 at once).
    #[error("{}", match .0 {
        Shed::QueueFull => "identity's in-flight limit and queue are full",
        Shed::QueueTimeout => "no in-flight place for the identity within queue_timeout",
    })]
    Shed(Shed),
    /// `Upgrade: websocket` where no tunnel is opened: a public client's
    /// WebSocket, or a receiver dialling the wrong path or port.
    #[error("{}", upgrade_refused_message(.0))]
    UpgradeRefused(TunnelHint),
    /// `max_upgraded_per_identity` upgraded streams are open for the
    /// route's identity (WebSocket pass-through, `gateway/passthrough.rs`).
    #[error("identity has {0} upgraded streams open (max_upgraded_per_identity)")]
    UpgradedLimit(usize),
    #[error("receiver reported an error: {0}")]
    Receiver(String),
    #[error("tunnel closed before the response arrived")]
    TunnelClosed,
    #[error("receiver sent an invalid response: {0}")]
    BadResponse(String),
    #[error("no response within timeout")]
    Timeout,
    /// The client went away (mid-body, or before its answer): nothing is
    /// written; logged as that (status 499 in the access log, never 400).
    #[error("client went away: {0}")]
    ClientGone(&'static str),
    /// A tunnel upgrade refused: authentication, caps, handshake.
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
}

/// Why a request was shed by admission (`gateway/admission.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    QueueFull,
    QueueTimeout,
}

impl Shed {
    /// The `reason` label of `anp_shed_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::QueueTimeout => "queue_timeout",
        }
    }
}

/// Why a tunnel upgrade was refused. The statuses are decided in
/// [`error_reply`] like every other.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpgradeError {
    /// Token or DID-WBA proof refused, or the identity owns no route.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// Too many unanswered upgrades (per IP or in all); `retry`: seconds.
    #[error("{0}")]
    Pending(super::upgrades::UpgradeRefusal, u32),
    #[error("upgrade not authenticated in time")]
    HandshakeTimeout,
    #[error("upgrade head not complete in time")]
    HeadTimeout,
    #[error("another receiver instance is connected for this identity")]
    DuplicateInstance,
    /// `scale`: a TLS tunnel asked for on core `.0` was accepted on a core
    /// that holds one already and cannot move; dial again at once.
    #[error("this tunnel was asked for on core {0}; dial again")]
    OtherCore(usize),
    #[error("X-ANPX-Instance must be 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadInstance,
    #[error("{0}")]
    BadHandshake(String),
}

impl UpgradeError {
    /// The stable reason name (JSON `error`, logs, `/metrics`).
    pub fn reason(&self) -> &'static str {
        match self {
            UpgradeError::Auth(e) => e.reason(),
            UpgradeError::Pending(r, _) => r.reason(),
            UpgradeError::HandshakeTimeout | UpgradeError::HeadTimeout => "handshake_timeout",
            UpgradeError::DuplicateInstance => "duplicate_instance",
            UpgradeError::OtherCore(_) => "tunnel_core",
            UpgradeError::BadInstance => "bad_instance",
            UpgradeError::BadHandshake(_) => "bad_handshake",
        }
    }
}

/// Which side of the proxy a failure came from (logs and the access log):
/// the public client, the gateway itself, a tunnel (its WebSocket or its
/// peer's protocol), the receiver, or the app behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Gateway,
    Tunnel,
    Receiver,
    App,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Gateway => "gateway",
            Side::Tunnel => "tunnel",
            Side::Receiver => "receiver",
            Side::App => "app",
        }
    }
}

/// Where tunnels are opened, for the refusal of an upgrade elsewhere: a
/// receiver that dials the wrong path learns the right one (it is no
/// secret: every receiver is configured with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelHint {
    /// On this port, at this path (`tunnel_path`).
    Path(String),
    /// Not on this port: on the gateway's `tunnel_port`, at this path.
    TunnelPort(String),
}

impl ProxyError {
    /// The refusal of a WebSocket upgrade that opens no tunnel here:
    /// `elsewhere` when this port takes no tunnels at all (`tunnel_port`
    /// is set), else the path was not `tunnel_path`.
    pub fn upgrade_refused(tunnel_path: &str, elsewhere: bool) -> ProxyError {
        let p = tunnel_path.to_owned();
        ProxyError::UpgradeRefused(if elsewhere {
            TunnelHint::TunnelPort(p)
        } else {
            TunnelHint::Path(p)
        })
    }
}

fn upgrade_refused_message(hint: &TunnelHint) -> String {
    match hint {
        TunnelHint::Path(p) => {
            format!("upgrade requests are not supported on this path; tunnels are opened on {p}")
        }
        TunnelHint::TunnelPort(p) => format!(
            "upgrade requests are not supported on this port; tunnels are opened on {p} at the \
             gateway's tunnel port"
        ),
    }
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
    /// More header fields (a 429's `RateLimit-Policy` and `RateLimit`).
    pub headers: Vec<(&'static str, String)>,
}

/// The status a refused tunnel upgrade gets (the refusal closes).
fn upgrade_status(e: &UpgradeError) -> (u16, Option<u32>) {
    use super::upgrades::UpgradeRefusal;
    use crate::auth::didwba::DidAuthError;
    use crate::auth::AuthError;
    match e {
        UpgradeError::Auth(AuthError::NoRoutes(_))
        | UpgradeError::Auth(AuthError::Did(DidAuthError::NoRoutes(_))) => (403, None),
        UpgradeError::Auth(AuthError::Did(
            DidAuthError::NonceCacheFull | DidAuthError::NonceStore(_),
        )) => (503, Some(1)),
        UpgradeError::Auth(_) => (401, None),
        UpgradeError::Pending(UpgradeRefusal::PerIp(_), retry) => (429, Some(*retry)),
        UpgradeError::Pending(UpgradeRefusal::Global(_) | UpgradeRefusal::Paced(_), retry) => {
            (503, Some(*retry))
        }
        UpgradeError::HandshakeTimeout | UpgradeError::HeadTimeout => (408, None),
        UpgradeError::DuplicateInstance => (409, None),
        UpgradeError::OtherCore(_) => (503, Some(0)),
        UpgradeError::BadInstance | UpgradeError::BadHandshake(_) => (400, None),
    }
}

/// The one mapping from failures to statuses.
pub fn error_reply(err: &ProxyError) -> ErrorReply {
    let (status, retry_after, close) = match err {
        ProxyError::ClientGone(_) => (499, None, true),
        ProxyError::Upgrade(u) => {
            let (status, retry) = upgrade_status(u);
            (status, retry, true)
        }
        ProxyError::Head(h) => (h.status(), None, true),
        ProxyError::BadRequest(_) => (400, None, true),
        ProxyError::HeadTimeout | ProxyError::BodyTimeout(_) => (408, None, true),
        ProxyError::NoRoute(_) => (404, None, false),
        ProxyError::BodyTooLarge(_) => (413, None, true),
        ProxyError::NoTunnel(_) => (503, Some(5), false),
        ProxyError::TunnelBusy(_) => (503, Some(1), false),
        ProxyError::RateLimited(l) => (429, Some(l.retry_after()), false),
        ProxyError::Shed(_) => (503, Some(1), false),
        ProxyError::UpgradedLimit(_) => (503, Some(1), true),
        ProxyError::UpgradeRefused(_) => (501, None, true),
        ProxyError::Receiver(_) | ProxyError::TunnelClosed | ProxyError::BadResponse(_) => {
            (502, None, false)
        }
        ProxyError::Timeout => (504, None, false),
    };
    let mut body = String::with_capacity(96);
    let _ = write!(body, "{{\"error\":{},", json_str(error_kind(err)));
    let _ = write!(
        body,
        "\"message\":{}",
        json_str(&public_message(err, status))
    );
    if let ProxyError::NoRoute(p) = err {
        let _ = write!(body, ",\"path\":{}", json_str(p));
    }
    body.push('}');
    let headers = match err {
        ProxyError::RateLimited(l) => vec![
            ("ratelimit-policy", l.policy.clone()),
            ("ratelimit", l.state.clone()),
        ],
        _ => Vec::new(),
    };
    ErrorReply {
        status,
        body,
        retry_after,
        close,
        headers,
    }
}

/// The body's `message`: a 4xx (or the 501 refusal) describes the
/// client's own request; a 5xx is one fixed sentence per status, since its
/// [`ProxyError`] may carry what the receiver reported (`cannot connect to
/// upstream 10.0.0.5:8001: Connection refused (os error 111)`) or an
/// identity's name. The full error is logged by the caller
/// (`gateway/conn.rs`: `request failed`, and the access log's `error`).
pub fn public_message(err: &ProxyError, status: u16) -> std::borrow::Cow<'static, str> {
    if let ProxyError::Upgrade(u) = err {
        // Told to the receiver that asked, about its own upgrade.
        return u.to_string().into();
    }
    match status {
        502 => "the service behind this route did not answer".into(),
        503 => {
            "the service behind this route is not available at the moment; try again later".into()
        }
        504 => "the service behind this route did not answer in time".into(),
        _ => err.to_string().into(),
    }
}

/// A short, stable name for logs, metrics and the JSON body.
pub fn error_kind(err: &ProxyError) -> &'static str {
    match err {
        ProxyError::Head(h) => match h.status() {
            414 => "uri_too_long",
            431 => "header_fields_too_large",
            501 => "not_implemented",
            _ => "bad_request",
        },
        ProxyError::BadRequest(_) => "bad_request",
        ProxyError::ClientGone(_) => "client_gone",
        ProxyError::Upgrade(u) => u.reason(),
        ProxyError::HeadTimeout | ProxyError::BodyTimeout(_) => "request_timeout",
        ProxyError::NoRoute(_) => "no_route",
        ProxyError::BodyTooLarge(_) => "body_too_large",
        ProxyError::NoTunnel(_) => "no_tunnel",
        ProxyError::TunnelBusy(_) => "tunnel_busy",
        ProxyError::RateLimited(_) => "rate_limited",
        ProxyError::Shed(s) => s.reason(),
        ProxyError::UpgradedLimit(_) => "upgraded_limit",
        ProxyError::UpgradeRefused(_) => "upgrade_refused",
        ProxyError::Receiver(_) => "receiver_error",
        ProxyError::TunnelClosed => "tunnel_closed",
        ProxyError::BadResponse(_) => "bad_response",
        ProxyError::Timeout => "timeout",
    }
}

impl ProxyError {
    /// Which side failed.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::Head(_)
            | ProxyError::BadRequest(_)
            | ProxyError::HeadTimeout
            | ProxyError::BodyTimeout(_)
            | ProxyError::BodyTooLarge(_)
            | ProxyError::NoRoute(_)
            | ProxyError::UpgradeRefused(_)
            | ProxyError::ClientGone(_) => Side::Client,
            ProxyError::RateLimited(_) => Side::Client,
            ProxyError::TunnelBusy(_) | ProxyError::Shed(_) | ProxyError::UpgradedLimit(_) => {
                Side::Gateway
            }
            ProxyError::NoTunnel(_) | ProxyError::TunnelClosed => Side::Tunnel,
            ProxyError::BadResponse(_) | ProxyError::Timeout => Side::Receiver,
            // What the receiver reports is the app's failure (cannot
            // connect, bad response, timeout upstream).
            ProxyError::Receiver(_) => Side::App,
            ProxyError::Upgrade(UpgradeError::Pending(_, _) | UpgradeError::OtherCore(_)) => {
                Side::Gateway
            }
            ProxyError::Upgrade(UpgradeError::Auth(crate::auth::AuthError::Did(
                crate::auth::didwba::DidAuthError::NonceCacheFull
                | crate::auth::didwba::DidAuthError::NonceStore(_),
            ))) => Side::Gateway,
            ProxyError::Upgrade(_) => Side::Receiver,
        }
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant: its status, kind, side, and whether the reply closes.
    #[test]
    fn the_error_plane_table() {
        use super::super::upgrades::UpgradeRefusal;
        use crate::auth::didwba::DidAuthError;
        use crate::auth::AuthError;
        use crate::http::HeadError;
        let up = |u| ProxyError::Upgrade(u);
        let rows: Vec<(ProxyError, u16, &str, Side)> = vec![
            (
                ProxyError::Head(HeadError::UriTooLong),
                414,
                "uri_too_long",
                Side::Client,
            ),
            (
                ProxyError::BadRequest("x"),
                400,
                "bad_request",
                Side::Client,
            ),
            (
                ProxyError::ClientGone("mid-body"),
                499,
                "client_gone",
                Side::Client,
            ),
            (
                ProxyError::HeadTimeout,
                408,
                "request_timeout",
                Side::Client,
            ),
            (
                ProxyError::BodyTimeout(super::super::pace::Stall::Rate),
                408,
                "request_timeout",
                Side::Client,
            ),
            (
                ProxyError::NoRoute("/x".into()),
                404,
                "no_route",
                Side::Client,
            ),
            (
                ProxyError::BodyTooLarge(1),
                413,
                "body_too_large",
                Side::Client,
            ),
            (
                ProxyError::UpgradedLimit(2),
                503,
                "upgraded_limit",
                Side::Gateway,
            ),
            (
                ProxyError::upgrade_refused("/ws", false),
                501,
                "upgrade_refused",
                Side::Client,
            ),
            (
                ProxyError::NoTunnel("a".into()),
                503,
                "no_tunnel",
                Side::Tunnel,
            ),
            (ProxyError::TunnelBusy(1), 503, "tunnel_busy", Side::Gateway),
            (
                ProxyError::RateLimited(Box::new(super::super::ratelimit::Limited {
                    scope: crate::config::RateScope::ClientIp,
                    policy_name: "p".into(),
                    policy: "\"p\";q=5;w=10".into(),
                    state: "\"p\";r=0;t=3".into(),
                    wait: std::time::Duration::from_millis(2_500),
                })),
                429,
                "rate_limited",
                Side::Client,
            ),
            (
                ProxyError::Shed(Shed::QueueFull),
                503,
                "queue_full",
                Side::Gateway,
            ),
            (
                ProxyError::Shed(Shed::QueueTimeout),
                503,
                "queue_timeout",
                Side::Gateway,
            ),
            (ProxyError::TunnelClosed, 502, "tunnel_closed", Side::Tunnel),
            (
                ProxyError::Receiver("boom".into()),
                502,
                "receiver_error",
                Side::App,
            ),
            (
                ProxyError::BadResponse("x".into()),
                502,
                "bad_response",
                Side::Receiver,
            ),
            (ProxyError::Timeout, 504, "timeout", Side::Receiver),
            (
                up(UpgradeError::Auth(AuthError::UnknownToken)),
                401,
                "unknown_token",
                Side::Receiver,
            ),
            (
                up(UpgradeError::Auth(AuthError::Did(
                    DidAuthError::ServiceDomain("x".into()),
                ))),
                401,
                "service_domain_mismatch",
                Side::Receiver,
            ),
            (
                up(UpgradeError::Auth(AuthError::NoRoutes("a".into()))),
                403,
                "no_routes",
                Side::Receiver,
            ),
            (
                up(UpgradeError::Auth(AuthError::Did(
                    DidAuthError::NonceCacheFull,
                ))),
                503,
                "nonce_cache_full",
                Side::Gateway,
            ),
            (
                up(UpgradeError::Auth(AuthError::Did(
                    DidAuthError::NonceStore("db down".into()),
                ))),
                503,
                "nonce_store_unavailable",
                Side::Gateway,
            ),
            (
                up(UpgradeError::Pending(UpgradeRefusal::PerIp(3), 10)),
                429,
                "pending_upgrades_per_ip",
                Side::Gateway,
            ),
            (
                up(UpgradeError::Pending(UpgradeRefusal::Global(3), 10)),
                503,
                "pending_upgrades",
                Side::Gateway,
            ),
            (
                up(UpgradeError::HandshakeTimeout),
                408,
                "handshake_timeout",
                Side::Receiver,
            ),
            (
                up(UpgradeError::DuplicateInstance),
                409,
                "duplicate_instance",
                Side::Receiver,
            ),
            (
                up(UpgradeError::OtherCore(1)),
                503,
                "tunnel_core",
                Side::Gateway,
            ),
            (
                up(UpgradeError::BadInstance),
                400,
                "bad_instance",
                Side::Receiver,
            ),
            (
                up(UpgradeError::BadHandshake("x".into())),
                400,
                "bad_handshake",
                Side::Receiver,
            ),
        ];
        for (e, status, kind, side) in rows {
            let r = error_reply(&e);
            assert_eq!(
                (r.status, error_kind(&e), e.side()),
                (status, kind, side),
                "{e}"
            );
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(v["error"], kind, "{e}");
            if matches!(e, ProxyError::Upgrade(_) | ProxyError::ClientGone(_)) {
                assert!(r.close, "{e}: an upgrade refusal closes");
            }
            if matches!(e, ProxyError::Upgrade(UpgradeError::Pending(..))) {
                assert_eq!(r.retry_after, Some(10), "{e}");
            }
            if let ProxyError::RateLimited(_) = e {
                assert_eq!(r.retry_after, Some(3));
                assert_eq!(
                    r.headers,
                    vec![
                        ("ratelimit-policy", "\"p\";q=5;w=10".to_string()),
                        ("ratelimit", "\"p\";r=0;t=3".to_string())
                    ]
                );
                assert!(!r.close, "a 429 keeps the connection");
            }
            if let ProxyError::Shed(_) = e {
                assert_eq!(r.retry_after, Some(1), "{e}: shed with Retry-After");
            }
        }
    }

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

    #[test]
    fn server_side_failures_tell_the_client_nothing_internal() {
        let detail = "cannot connect to upstream 10.0.0.5:8001: Connection refused (os error 111)";
        for e in [
            ProxyError::Receiver(detail.into()),
            ProxyError::BadResponse(format!("{detail} from app.internal.example")),
            ProxyError::NoTunnel("did:wba:internal.example:alice".into()),
            ProxyError::TunnelBusy(4096),
            ProxyError::TunnelClosed,
            ProxyError::Timeout,
        ] {
            let r = error_reply(&e);
            assert!(r.status >= 500, "{e}");
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            // The shape stays: a kind and a sentence.
            assert_eq!(v["error"], error_kind(&e));
            let m = v["message"].as_str().unwrap();
            assert!(m.starts_with("the service behind this route"), "{m}");
            for leak in ["10.0.0.5", "os error", "internal.example", "alice", "4096"] {
                assert!(!r.body.contains(leak), "{e}: {}", r.body);
            }
        }
        // A client error still says what was wrong with the request.
        let r = error_reply(&ProxyError::BodyTooLarge(10));
        assert!(r.body.contains("max_body_size"), "{}", r.body);
    }

    #[test]
    fn a_refused_upgrade_names_where_tunnels_are_opened() {
        let r = error_reply(&ProxyError::UpgradeRefused(TunnelHint::Path("/ws".into())));
        assert_eq!(r.status, 501);
        assert!(r.body.contains("tunnels are opened on /ws"), "{}", r.body);
        let r = error_reply(&ProxyError::UpgradeRefused(TunnelHint::TunnelPort(
            "/ws".into(),
        )));
        assert!(r.body.contains("tunnel port"), "{}", r.body);
    }
}
