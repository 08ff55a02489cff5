//! Pieces shared by the request and response head parsers: message framing
//! fields (Content-Length, Transfer-Encoding), turning httparse's borrowed
//! slices into ranges, and the httparse header slots.
//!
//! Framing is where request smuggling lives (RFC 9112 §11.2), so every rule
//! here is strict; the response parser decides separately what to do with
//! Content-Length next to Transfer-Encoding.

use std::ops::Range;

use super::headers::{list_elements, trim_ows};
use super::HeadError;

/// httparse header slots kept on the stack up to this many fields: the
/// default limit (100) fits, so parsing a head allocates nothing but the
/// final `Vec<HeaderPos>`. 128 × 32 bytes = 4 KiB of stack.
pub(super) const STACK_HEADERS: usize = 128;

/// Byte range of `part` inside `base`. httparse hands out subslices of the
/// buffer it parsed, except for a few static `""` fallbacks (e.g. a reason
/// phrase with obs-text); those map to an empty range at 0 rather than
/// a bogus offset.
pub(super) fn span(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
    if start <= base.len() && part.len() <= base.len() - start {
        start..start + part.len()
    } else {
        0..0
    }
}

/// Content-Length and Transfer-Encoding as seen across all field lines.
#[derive(Debug, Default)]
pub(super) struct Framing {
    pub content_length: Option<u64>,
    /// A Transfer-Encoding field was present (even with an empty value).
    pub te_present: bool,
    chunked_count: u32,
    last_is_chunked: bool,
    other_coding: bool,
}

impl Framing {
    /// One Content-Length field line. `Content-Length = 1*DIGIT`
    /// (RFC 9110 §8.6); a comma list of identical values, or repeated
    /// identical lines, may be taken as that one value, but any difference,
    /// sign, inner space, empty element or overflow is an unrecoverable
    /// framing error (RFC 9112 §6.3 item 5).
    pub fn add_content_length(&mut self, value: &[u8]) -> Result<(), HeadError> {
        // Not `list_elements`: it skips empty elements, and `5,` or an empty
        // value must be refused here, not read as `5` / absent.
        for element in value.split(|&b| b == b',') {
            let n = parse_decimal(trim_ows(element)).ok_or(HeadError::InvalidContentLength)?;
            match self.content_length {
                Some(prev) if prev != n => return Err(HeadError::DifferingContentLength),
                _ => self.content_length = Some(n),
            }
        }
        Ok(())
    }

    /// One Transfer-Encoding field line; codings of several lines form one
    /// list in order (RFC 9110 §5.3).
    pub fn add_transfer_encoding(&mut self, value: &[u8]) {
        self.te_present = true;
        for coding in list_elements(value) {
            // Transfer-coding names are case-insensitive (RFC 9112 §7).
            // `chunked;x=y` is not `chunked` (chunked takes no parameters).
            let is_chunked = coding.eq_ignore_ascii_case(b"chunked");
            if is_chunked {
                self.chunked_count += 1;
            } else {
                self.other_coding = true;
            }
            self.last_is_chunked = is_chunked;
        }
    }

    /// Whether the Transfer-Encoding seen so far is exactly `chunked`
    /// (RFC 9112 §6.3 item 4: chunked must be the final coding and applied
    /// once, §6.1). Only meaningful when `te_present`.
    pub fn check_transfer_encoding(&self) -> Result<(), HeadError> {
        if self.chunked_count > 1 {
            Err(HeadError::ChunkedTwice)
        } else if !self.last_is_chunked {
            Err(HeadError::ChunkedNotLast)
        } else if self.other_coding {
            Err(HeadError::UnsupportedTransferCoding)
        } else {
            Ok(())
        }
    }
}

/// `1*DIGIT` into a u64, refusing empty input, any non-digit (`+`, `-`,
/// spaces) and overflow.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// `uri-host [ ":" port ]` alphabet (RFC 9110 §7.2, RFC 3986 §3.2.2):
/// unreserved, sub-delims, pct-encoded, `:` and the IP-literal brackets.
/// Refuses whitespace, `/`, `@` (userinfo, RFC 9110 §4.2.4), `?`, `#` and
/// non-ASCII, so a Host value can be copied into X-Forwarded-Host or
/// compared with a configured domain without surprises.
pub(super) fn is_valid_authority(value: &[u8]) -> bool {
    value.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
                    | b':'
                    | b'['
                    | b']'
            )
    })
}

/// httparse's error, named for the log.
pub(super) fn tokeniser_error(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        httparse::Error::HeaderName => HeadError::Malformed("invalid field name"),
        httparse::Error::HeaderValue => HeadError::Malformed("invalid field value"),
        httparse::Error::NewLine => HeadError::Malformed("invalid line ending"),
        httparse::Error::Status => HeadError::Malformed("invalid status-line"),
        httparse::Error::Token => HeadError::Malformed("invalid method or request-target"),
        httparse::Error::Version => HeadError::Malformed("invalid HTTP version"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_refuses_everything_but_digits() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"0042"), Some(42));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"+5",
            b"-5",
            b"5 5",
            b"0x10",
            b"18446744073709551616",
            b"99999999999999999999999",
        ] {
            assert_eq!(parse_decimal(bad), None, "{:?}", bad);
        }
    }

    #[test]
    fn span_of_foreign_slice_is_empty() {
        let buf = b"abcdef";
        assert_eq!(span(buf, &buf[2..4]), 2..4);
        assert_eq!(span(buf, &buf[6..]), 6..6);
        assert_eq!(span(buf, b"zz"), 0..0);
    }

    #[test]
    fn authority_alphabet() {
        assert!(is_valid_authority(b"example.com:8080"));
        assert!(is_valid_authority(b"[::1]:80"));
        assert!(is_valid_authority(b""));
        for bad in [
            &b"a b"[..],
            b"a/b",
            b"user@host",
            b"h\xc3\xa9",
            b"a?b",
            b"a#b",
        ] {
            assert!(!is_valid_authority(bad), "{:?}", bad);
        }
    }
}
