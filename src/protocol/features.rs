//! Negotiated ANPX extensions (PROTOCOL.md §7): the receiver lists tokens
//! in `X-ANPX-Features`, the gateway answers with the subset it will use.
//! A peer that sends no header gets plain v1.

/// Request header carrying the receiver's offer and the gateway's answer.
pub const FEATURES_HEADER: &str = "X-ANPX-Features";
/// 101 response header: how many tunnels the receiver should keep open.
pub const TUNNELS_HEADER: &str = "X-ANPX-Tunnels";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `raw_target` and `header_list` in meta JSON.
    pub exact: bool,
    /// Bodies travel as they arrive, with per-request credit.
    pub stream: bool,
    /// A gateway error frame for a live request = the client went away.
    pub cancel: bool,
}

impl Features {
    /// What this build implements.
    pub const SUPPORTED: Features = Features {
        exact: true,
        stream: true,
        cancel: true,
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
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "exact, stream, cancel"
        );
        assert!(!Features::parse(b"exact").stream);
    }
}
