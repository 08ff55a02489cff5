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
}

impl Features {
    /// What this build implements.
    pub const SUPPORTED: Features = Features { exact: true };

    /// Parses a comma-separated token list; unknown tokens are ignored.
    pub fn parse(value: &[u8]) -> Features {
        let mut f = Features::default();
        for tok in value.split(|b| *b == b',') {
            if tok.trim_ascii().eq_ignore_ascii_case(b"exact") {
                f.exact = true;
            }
        }
        f
    }

    /// The subset both sides support.
    pub fn intersect(self, other: Features) -> Features {
        Features {
            exact: self.exact && other.exact,
        }
    }

    /// The header value (empty when nothing is negotiated).
    pub fn to_header_value(self) -> String {
        let mut v = Vec::new();
        if self.exact {
            v.push("exact");
        }
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_intersect() {
        assert!(Features::parse(b"stream, EXACT ,cancel").exact);
        assert!(!Features::parse(b"stream,exactly").exact);
        assert!(!Features::parse(b"").exact);
        assert_eq!(
            Features::SUPPORTED.intersect(Features::default()),
            Features::default()
        );
        assert_eq!(Features::SUPPORTED.to_header_value(), "exact");
    }
}
