//! Negotiated ANPX extensions (PROTOCOL.md §7): the receiver lists tokens
//! in `X-ANPX-Features`, the gateway answers with the subset it will use.
//! A peer that sends no header gets plain v1.

use super::anpx::BodyCrc;

/// Request header carrying the receiver's offer and the gateway's answer.
pub const FEATURES_HEADER: &str = "X-ANPX-Features";
/// 101 response header: how many tunnels the receiver should keep open.
pub const TUNNELS_HEADER: &str = "X-ANPX-Tunnels";
/// Upgrade request header: the receiver instance opening the tunnel
/// (`instance_id`), so the gateway can tell one receiver's tunnels from a
/// second receiver presenting the same credentials.
pub const INSTANCE_HEADER: &str = "X-ANPX-Instance";

/// WebSocket close code (private-use range, RFC 6455 §7.4.2): this tunnel
/// was closed because another receiver instance of its identity replaced it
/// (`duplicate_tunnels = "replace"`). A receiver that gets it stops instead
/// of reconnecting (docs/PROTOCOL.md).
pub const CLOSE_REPLACED: u16 = 4001;

/// WebSocket close code (private-use range): the gateway lets this tunnel
/// go because the identity's traffic no longer pays for it (`scale`,
/// PROTOCOL.md §7.8). Sent only once nothing is in flight on it; the
/// receiver ends that tunnel's slot instead of redialling.
pub const CLOSE_RELEASED: u16 = 4002;

/// Exit status of a receiver replaced by another instance (`CLOSE_REPLACED`):
/// supervisors should not restart on it (systemd `RestartPreventExitStatus=3`).
pub const EXIT_REPLACED: i32 = 3;

/// Is `v` a valid `X-ANPX-Instance` value: 1 to 64 of `A-Z a-z 0-9 . _ -`?
pub fn valid_instance(v: &[u8]) -> bool {
    (1..=64).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `raw_target` and `header_list` in meta JSON.
    pub exact: bool,
    /// Bodies travel as they arrive, with per-request credit.
    pub stream: bool,
    /// A gateway error frame for a live request = the client went away.
    pub cancel: bool,
    /// Metas as length-prefixed bytes instead of JSON (PROTOCOL.md §7.5).
    /// Only together with `stream` (the reassembler of whole messages
    /// reads JSON only).
    pub binmeta: bool,
    /// WebSocket pass-through (PROTOCOL.md §7.6): an `Upgrade` request
    /// answered 101 becomes a full-duplex byte stream under its
    /// `request_id`. Only together with `stream` (it rides on streamed
    /// bodies and their credit).
    pub upgrade: bool,
    /// The receiver masks its frames with the all-zero key (PROTOCOL.md
    /// §7.7): framing per RFC 6455, no copy or XOR of what it sends.
    pub zeromask: bool,
    /// Tunnels scale with load (PROTOCOL.md §7.8): the receiver starts
    /// with one, the gateway asks for more with a `tunnels` text message
    /// and lets them go with close code [`CLOSE_RELEASED`]. A receiver with
    /// a pinned `tunnels = N` does not offer it.
    pub scale: bool,
    /// Frames may carry `body_crc = 0` (PROTOCOL.md §7.9): the sender does
    /// not compute the CRC of a large body and the receiver does not check
    /// a zero one; a non-zero `body_crc` is still checked. The gateway
    /// answers it unless `tunnel_body_crc = true`, and only together with
    /// `stream` (whole messages go through the v1 reassembler).
    pub nocrc: bool,
}

impl Features {
    /// What this build implements.
    pub const SUPPORTED: Features = Features {
        exact: true,
        stream: true,
        cancel: true,
        binmeta: true,
        upgrade: true,
        zeromask: true,
        scale: true,
        nocrc: true,
    };

    /// Parses a comma-separated token list; unknown tokens are ignored.
    pub fn parse(value: &[u8]) -> Features {
        let mut f = Features::default();
        for tok in value.split(|b| *b == b',') {
            let tok = tok.trim_ascii();
            if tok.eq_ignore_ascii_case(b"exact") {
                f.exact = true;
            } else if tok.eq_ignore_ascii_case(b"stream") {
                f.stream = true;
            } else if tok.eq_ignore_ascii_case(b"cancel") {
                f.cancel = true;
            } else if tok.eq_ignore_ascii_case(b"binmeta") {
                f.binmeta = true;
            } else if tok.eq_ignore_ascii_case(b"upgrade") {
                f.upgrade = true;
            } else if tok.eq_ignore_ascii_case(b"zeromask") {
                f.zeromask = true;
            } else if tok.eq_ignore_ascii_case(b"scale") {
                f.scale = true;
            } else if tok.eq_ignore_ascii_case(b"nocrc") {
                f.nocrc = true;
            }
        }
        f
    }

    /// The subset both sides support.
    pub fn intersect(self, other: Features) -> Features {
        Features {
            exact: self.exact && other.exact,
            stream: self.stream && other.stream,
            cancel: self.cancel && other.cancel,
            binmeta: self.binmeta && other.binmeta && self.stream && other.stream,
            upgrade: self.upgrade && other.upgrade && self.stream && other.stream,
            zeromask: self.zeromask && other.zeromask,
            scale: self.scale && other.scale,
            // Only with `stream`: the reassembler of whole messages checks
            // every CRC.
            nocrc: self.nocrc && other.nocrc && self.stream && other.stream,
        }
    }

    /// The header value (empty when nothing is negotiated).
    pub fn to_header_value(self) -> String {
        let mut v = Vec::new();
        if self.exact {
            v.push("exact");
        }
        if self.stream {
            v.push("stream");
        }
        if self.cancel {
            v.push("cancel");
        }
        if self.binmeta {
            v.push("binmeta");
        }
        if self.upgrade {
            v.push("upgrade");
        }
        if self.zeromask {
            v.push("zeromask");
        }
        if self.scale {
            v.push("scale");
        }
        if self.nocrc {
            v.push("nocrc");
        }
        v.join(", ")
    }

    /// How this tunnel's frames carry `body_crc` (`nocrc`).
    pub fn body_crc(self) -> BodyCrc {
        if self.nocrc {
            BodyCrc::Omitted
        } else {
            BodyCrc::Computed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names() {
        assert!(valid_instance(b"4f1c-host.a_1"));
        assert!(!valid_instance(b""));
        assert!(!valid_instance(b"a b"));
        assert!(!valid_instance(&[b'a'; 65]));
    }

    #[test]
    fn parse_and_intersect() {
        let f = Features::parse(b"stream, EXACT ,cancel");
        assert!(f.exact && f.stream && f.cancel);
        assert!(!Features::parse(b"stream,exactly").exact);
        assert!(!Features::parse(b"").exact);
        assert_eq!(
            Features::SUPPORTED.intersect(Features::default()),
            Features::default()
        );
        assert_eq!(
            Features::SUPPORTED.to_header_value(),
            "exact, stream, cancel, binmeta, upgrade, zeromask, scale, nocrc"
        );
        assert!(
            !Features::parse(b"upgrade")
                .intersect(Features::SUPPORTED)
                .upgrade,
            "upgrade is only answered together with stream"
        );
        assert!(
            !Features::parse(b"nocrc")
                .intersect(Features::SUPPORTED)
                .nocrc,
            "nocrc is only answered together with stream"
        );
        assert!(
            Features::parse(b"stream, nocrc")
                .intersect(Features::SUPPORTED)
                .nocrc
        );
        // `zeromask` needs nothing else.
        assert!(
            Features::parse(b"zeromask")
                .intersect(Features::SUPPORTED)
                .zeromask
        );
        assert!(
            Features::parse(b"stream, upgrade")
                .intersect(Features::SUPPORTED)
                .upgrade
        );
        assert!(
            !Features::parse(b"binmeta")
                .intersect(Features::SUPPORTED)
                .binmeta
        );
        assert!(!Features::parse(b"exact").stream);
    }
}
