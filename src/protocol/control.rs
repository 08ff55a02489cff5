//! Text control messages on a tunnel (PROTOCOL.md §6, §7), sans-IO: JSON
//! objects told apart by their `"type"`. Only the two anp-proxy sends are
//! typed here: `credit` (the `stream` flow control, §7.1), `draining`
//! (a receiver that is leaving, §7.4) and `tunnels` (the gateway asks for
//! more tunnels, `scale`, §7.8). Anything else (the reference's
//! `heartbeat`, `connection_ready`, what a newer peer may add) is `None`:
//! activity only, never an error.

/// What a text control message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// `bytes` more of window for the body of `request_id` (`stream`).
    Credit { request_id: String, bytes: usize },
    /// The receiver is shutting down: send it no new request; the ones in
    /// flight still complete on this tunnel (§7.4).
    Draining,
    /// The gateway wants this many tunnels from this receiver instance in
    /// all (`scale`, §7.8): a receiver with fewer opens the difference.
    Tunnels { want: usize },
}

/// The gateway's `tunnels` message (§7.8).
pub fn tunnels_message(want: usize) -> Vec<u8> {
    format!("{{\"type\":\"tunnels\",\"want\":{want}}}").into_bytes()
}

/// The receiver's draining notice, exactly as sent (§7.4).
pub const DRAINING_MESSAGE: &[u8] = b"{\"type\":\"draining\"}";

/// The payload of the ping a draining receiver sends right after its
/// notice: a peer answers pings in order, so the pong says the gateway has
/// read the notice, and every request it sent before is in (§7.4).
pub const DRAINING_PING: &[u8] = b"anpx-draining";

#[derive(serde::Deserialize)]
struct Wire {
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    request_id: String,
    #[serde(default)]
    bytes: u64,
    #[serde(default)]
    want: u64,
}

/// Parses a text message; `None` for any message we do not act on.
pub fn parse(text: &[u8]) -> Option<Control> {
    let w: Wire = serde_json::from_slice(text).ok()?;
    match w.ty.as_str() {
        "credit" if !w.request_id.is_empty() => Some(Control::Credit {
            request_id: w.request_id,
            bytes: usize::try_from(w.bytes).unwrap_or(usize::MAX),
        }),
        "draining" => Some(Control::Draining),
        "tunnels" if w.want > 0 => Some(Control::Tunnels {
            want: usize::try_from(w.want).unwrap_or(usize::MAX),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::stream::credit_message;

    #[test]
    fn credit_round_trip() {
        let m = credit_message("a\"b", 4096);
        assert_eq!(
            parse(&m),
            Some(Control::Credit {
                request_id: "a\"b".to_owned(),
                bytes: 4096
            })
        );
        assert_eq!(parse(b"{\"type\":\"credit\",\"bytes\":1}"), None);
    }

    #[test]
    fn tunnels_round_trip_and_zero_is_ignored() {
        assert_eq!(
            parse(&tunnels_message(3)),
            Some(Control::Tunnels { want: 3 })
        );
        assert_eq!(parse(b"{\"type\":\"tunnels\",\"want\":0}"), None);
        assert_eq!(parse(b"{\"type\":\"tunnels\"}"), None);
    }

    #[test]
    fn draining_is_recognised_and_the_rest_ignored() {
        assert_eq!(parse(DRAINING_MESSAGE), Some(Control::Draining));
        assert_eq!(
            parse(b"{ \"type\" : \"draining\", \"why\": \"SIGTERM\" }"),
            Some(Control::Draining),
            "extra keys are allowed (§4's rule for meta holds here too)"
        );
        assert_eq!(parse(b"{\"type\":\"heartbeat\"}"), None);
        assert_eq!(parse(b"{\"type\":\"connection_ready\"}"), None);
        assert_eq!(parse(b"not json"), None);
        assert_eq!(parse(b"{\"kind\":\"draining\"}"), None);
    }
}
