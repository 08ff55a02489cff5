//! Incremental decoder and encoder helpers for the chunked transfer coding
//! (RFC 9112 §7.1).
//!
//! The decoder is a byte-level state machine, resumable at every byte
//! boundary: it consumes framing bytes from the caller's `BytesMut` and
//! hands chunk data back as zero-copy `split_to(..).freeze()` slices of it.
//! It never buffers data itself and never allocates. Chunk extensions and
//! trailers are validated for line endings, bounded by one budget for the
//! whole body (so many tiny chunks with extensions cannot make it do
//! unbounded work), and discarded: the gateway re-frames the body, and
//! forwarding trailers is not something DESIGN.md promises.

use bytes::{Buf, Bytes, BytesMut};

use super::headers::is_tchar;
use super::ChunkedError;

/// `last-chunk` followed by the empty trailer section (RFC 9112 §7.1).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// CRLF that ends every chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";

/// Append `{len in hex}\r\n`. `len` must not be 0: a zero-size chunk is the
/// last-chunk and would end the body early; write [`LAST_CHUNK`] for that.
pub fn write_chunk_header(out: &mut impl bytes::BufMut, len: usize) {
    debug_assert!(
        len != 0,
        "a zero-length chunk ends the body; use LAST_CHUNK"
    );
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Hand-formatted into a stack buffer: `write!` through fmt is far
    // slower than this on a path taken once per forwarded chunk.
    let mut tmp = [0u8; 2 * std::mem::size_of::<usize>() + 2];
    let mut i = tmp.len() - 2;
    tmp[i..].copy_from_slice(b"\r\n");
    let mut n = len;
    loop {
        i -= 1;
        tmp[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&tmp[i..]);
}

/// What one [`ChunkedDecoder::decode`] call produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkedStep {
    /// Body bytes, split off the front of the input without copying.
    Data(Bytes),
    /// The input is used up; call again once more bytes have arrived.
    NeedMore,
    /// The last chunk and trailers are consumed; whatever follows in the
    /// input is the next message.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// In the chunk-size hex digits.
    Size {
        value: u64,
        digits: u8,
    },
    /// Whitespace after the size: only allowed before `;` (`BWS`).
    SizeWs {
        value: u64,
    },
    /// Inside chunk extensions, up to CR.
    Ext {
        value: u64,
    },
    /// CR of the size line seen, LF expected.
    SizeLf {
        value: u64,
    },
    /// In chunk data.
    Data {
        remaining: u64,
    },
    /// After data, CR expected.
    DataCr,
    /// After data and CR, LF expected.
    DataLf,
    /// At the start of a trailer line or of the final empty line.
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    /// CR seen in the trailer section; `last` if it ends the empty line.
    TrailerLf {
        last: bool,
    },
    Done,
    /// A previous call failed; the stream is unusable.
    Failed(ChunkedError),
}

/// Resumable chunked body decoder. Any error is fatal for the connection.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Bytes of chunk extensions, size-line whitespace and trailers still
    /// allowed across the whole body.
    budget: usize,
}

impl ChunkedDecoder {
    /// `max_chunk_ext_and_trailer` bounds the total bytes of chunk
    /// extensions and trailer section in this body.
    pub fn new(max_chunk_ext_and_trailer: usize) -> Self {
        ChunkedDecoder {
            state: State::Size {
                value: 0,
                digits: 0,
            },
            budget: max_chunk_ext_and_trailer,
        }
    }

    /// True once the last chunk and trailers have been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decode from the front of `input`, consuming what was used.
    /// Call repeatedly until `NeedMore` (read more) or `Done`.
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<ChunkedStep, ChunkedError> {
        let mut used = 0;
        let result = self.run(input, &mut used);
        if let Err(e) = &result {
            self.state = State::Failed(e.clone());
        }
        // Framing bytes consumed before the result (data is split off in
        // `run` after this prefix has been advanced past).
        input.advance(used);
        result
    }

    fn run(&mut self, input: &mut BytesMut, used: &mut usize) -> Result<ChunkedStep, ChunkedError> {
        loop {
            match self.state {
                State::Data { remaining } => {
                    if *used == input.len() {
                        return Ok(ChunkedStep::NeedMore);
                    }
                    input.advance(*used);
                    *used = 0;
                    let n = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(input.len());
                    let remaining = remaining - n as u64;
                    self.state = if remaining == 0 {
                        State::DataCr
                    } else {
                        State::Data { remaining }
                    };
                    return Ok(ChunkedStep::Data(input.split_to(n).freeze()));
                }
                State::Done => return Ok(ChunkedStep::Done),
                State::Failed(ref e) => return Err(e.clone()),
                _ => {}
            }
            let Some(&b) = input.get(*used) else {
                return Ok(ChunkedStep::NeedMore);
            };
            *used += 1;
            self.state = self.step(b)?;
        }
    }

    /// One framing byte. Grammar (RFC 9112 §7.1, §7.1.1, §7.1.2):
    /// ```text
    /// chunk      = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
    /// chunk-size = 1*HEXDIG
    /// chunk-ext  = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
    /// last-chunk = 1*("0") [ chunk-ext ] CRLF
    /// trailer-section = *( field-line CRLF ), then CRLF
    /// ```
    fn step(&mut self, b: u8) -> Result<State, ChunkedError> {
        Ok(match self.state.clone() {
            State::Size { value, digits } => match (hex_value(b), b) {
                (Some(d), _) => {
                    // 16 hex digits fill a u64; a 17th (even a leading zero)
                    // is refused rather than risk any overflow arithmetic.
                    if digits == 16 {
                        return Err(ChunkedError::SizeOverflow);
                    }
                    State::Size {
                        value: (value << 4) | u64::from(d),
                        digits: digits + 1,
                    }
                }
                _ if digits == 0 => return Err(ChunkedError::InvalidSize),
                (None, b';') => self.spend(State::Ext { value })?,
                (None, b' ' | b'\t') => self.spend(State::SizeWs { value })?,
                (None, b'\r') => State::SizeLf { value },
                (None, b'\n') => return Err(ChunkedError::BareLineEnding),
                (None, _) => return Err(ChunkedError::InvalidSize),
            },
            // Whitespace after the size is only BWS before an extension;
            // `5 \r\n` is refused, as servers disagree on it.
            State::SizeWs { value } => match b {
                b' ' | b'\t' => self.spend(State::SizeWs { value })?,
                b';' => self.spend(State::Ext { value })?,
                _ => return Err(ChunkedError::InvalidSize),
            },
            // Extension names and values are ignored, but the bytes must
            // not include line endings or controls, so the extension ends
            // exactly where every other parser would end it.
            State::Ext { value } => match b {
                b'\r' => State::SizeLf { value },
                b'\n' => return Err(ChunkedError::BareLineEnding),
                b'\t' => self.spend(State::Ext { value })?,
                0..=0x1f | 0x7f => return Err(ChunkedError::InvalidExtension),
                _ => self.spend(State::Ext { value })?,
            },
            State::SizeLf { value } => match b {
                b'\n' if value == 0 => State::TrailerStart,
                b'\n' => State::Data { remaining: value },
                _ => return Err(ChunkedError::BareLineEnding),
            },
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return Err(ChunkedError::MissingDataCrlf),
            },
            State::DataLf => match b {
                b'\n' => State::Size {
                    value: 0,
                    digits: 0,
                },
                _ => return Err(ChunkedError::MissingDataCrlf),
            },
            State::TrailerStart => match b {
                b'\r' => State::TrailerLf { last: true },
                b'\n' => return Err(ChunkedError::BareLineEnding),
                // A field line starts with a field-name (a token); a
                // leading space would be obs-fold (RFC 9112 §5.2).
                _ if is_tchar(b) => self.spend(State::TrailerLine)?,
                _ => return Err(ChunkedError::InvalidTrailer),
            },
            State::TrailerLine => match b {
                b'\r' => self.spend(State::TrailerLf { last: false })?,
                b'\n' => return Err(ChunkedError::BareLineEnding),
                b'\t' => self.spend(State::TrailerLine)?,
                0..=0x1f | 0x7f => return Err(ChunkedError::InvalidTrailer),
                _ => self.spend(State::TrailerLine)?,
            },
            State::TrailerLf { last } => match b {
                b'\n' if last => State::Done,
                b'\n' => self.spend(State::TrailerStart)?,
                _ => return Err(ChunkedError::BareLineEnding),
            },
            // Handled in `run` without consuming input.
            State::Data { .. } | State::Done | State::Failed(_) => {
                unreachable!("state consumes no framing byte")
            }
        })
    }

    /// Charge one byte of extension/trailer to the budget.
    fn spend(&mut self, next: State) -> Result<State, ChunkedError> {
        self.budget = self
            .budget
            .checked_sub(1)
            .ok_or(ChunkedError::ExtensionsOrTrailersTooLarge)?;
        Ok(next)
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `input` in pieces cut at `cuts`, collect data until Done.
    fn decode_split(
        input: &[u8],
        cuts: &[usize],
        budget: usize,
    ) -> Result<(Vec<u8>, Vec<u8>), ChunkedError> {
        let mut dec = ChunkedDecoder::new(budget);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        let mut points: Vec<usize> = cuts.iter().copied().filter(|&c| c <= input.len()).collect();
        points.push(input.len());
        for p in points {
            if p < fed {
                continue;
            }
            buf.extend_from_slice(&input[fed..p]);
            fed = p;
            loop {
                match dec.decode(&mut buf)? {
                    ChunkedStep::Data(d) => {
                        assert!(!d.is_empty());
                        out.extend_from_slice(&d);
                    }
                    ChunkedStep::NeedMore => break,
                    ChunkedStep::Done => {
                        // What follows the body: the unconsumed input plus
                        // whatever had not been fed yet.
                        let mut rest = buf.to_vec();
                        rest.extend_from_slice(&input[fed..]);
                        return Ok((out, rest));
                    }
                }
            }
        }
        panic!("not done; decoded {:?}", String::from_utf8_lossy(&out));
    }

    fn decode_all(input: &[u8]) -> Result<Vec<u8>, ChunkedError> {
        decode_split(input, &[], 1024).map(|(d, _)| d)
    }

    fn first_error(input: &[u8]) -> ChunkedError {
        let mut dec = ChunkedDecoder::new(64);
        let mut buf = BytesMut::from(input);
        loop {
            match dec.decode(&mut buf) {
                Ok(ChunkedStep::Data(_)) => {}
                Ok(step) => panic!("expected an error, got {step:?}"),
                Err(e) => return e,
            }
        }
    }

    const BODY: &[u8] =
        b"5\r\nhello\r\n1;name=val;q=\"a b\"\r\n \r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\nY: 2\r\n\r\nNEXT";

    #[test]
    fn decodes_whole() {
        let (data, rest) = decode_split(BODY, &[], 1024).unwrap();
        assert_eq!(data, b"hello 0123456789");
        assert_eq!(rest, b"NEXT");
    }

    #[test]
    fn decodes_at_every_split_point() {
        for cut in 0..=BODY.len() {
            let (data, rest) = decode_split(BODY, &[cut], 1024).unwrap();
            assert_eq!(data, b"hello 0123456789", "cut {cut}");
            assert_eq!(rest, b"NEXT", "cut {cut}");
        }
        // And one byte at a time.
        let cuts: Vec<usize> = (0..BODY.len()).collect();
        let (data, _) = decode_split(BODY, &cuts, 1024).unwrap();
        assert_eq!(data, b"hello 0123456789");
    }

    #[test]
    fn data_is_zero_copy() {
        let mut buf = BytesMut::from(&b"4\r\nabcd\r\n0\r\n\r\n"[..]);
        let base = buf.as_ptr() as usize;
        let mut dec = ChunkedDecoder::new(16);
        let ChunkedStep::Data(d) = dec.decode(&mut buf).unwrap() else {
            panic!("no data")
        };
        assert_eq!(&d[..], b"abcd");
        assert_eq!(d.as_ptr() as usize, base + 3);
        assert_eq!(dec.decode(&mut buf).unwrap(), ChunkedStep::Done);
        assert!(dec.is_done());
        assert!(buf.is_empty());
        // Done is sticky and consumes nothing more.
        buf.extend_from_slice(b"GET");
        assert_eq!(dec.decode(&mut buf).unwrap(), ChunkedStep::Done);
        assert_eq!(&buf[..], b"GET");
    }

    #[test]
    fn uppercase_hex_and_leading_zeros() {
        assert_eq!(
            decode_all(b"00B\r\nhello world\r\n000\r\n\r\n").unwrap(),
            b"hello world"
        );
    }

    #[test]
    fn sixteen_hex_digits_ok_seventeen_overflow() {
        let mut dec = ChunkedDecoder::new(16);
        let mut buf = BytesMut::from(&b"ffffffffffffffff\r\nab"[..]);
        let ChunkedStep::Data(d) = dec.decode(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(&d[..], b"ab");
        assert_eq!(
            first_error(b"10000000000000000\r\n"),
            ChunkedError::SizeOverflow
        );
        assert_eq!(
            first_error(b"00000000000000001\r\n"),
            ChunkedError::SizeOverflow
        );
        assert_eq!(ChunkedError::SizeOverflow.status(), 400);
    }

    #[test]
    fn invalid_sizes() {
        for bad in [
            &b"\r\n"[..],
            b";x\r\n",
            b"-1\r\n",
            b"0x5\r\n",
            b"g\r\n",
            b" 5\r\n",
            b"5 \r\n",
            b"+5\r\n",
        ] {
            assert_eq!(
                first_error(bad),
                ChunkedError::InvalidSize,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // BWS before an extension is fine.
        assert_eq!(decode_all(b"1 ;x\r\na\r\n0\r\n\r\n").unwrap(), b"a");
    }

    #[test]
    fn bare_line_endings_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\rhello\r\n",
            b"5;x\nhello\r\n",
            b"0\r\n\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\n\r\r",
        ] {
            assert_eq!(
                first_error(bad),
                ChunkedError::BareLineEnding,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn data_must_end_with_crlf() {
        assert_eq!(first_error(b"3\r\nabcd\r\n"), ChunkedError::MissingDataCrlf);
        assert_eq!(
            first_error(b"3\r\nabc\n0\r\n\r\n"),
            ChunkedError::MissingDataCrlf
        );
        assert_eq!(first_error(b"3\r\nabc\rX"), ChunkedError::MissingDataCrlf);
    }

    #[test]
    fn extensions_and_trailers_are_bounded() {
        let long_ext = format!("1;{}\r\na\r\n0\r\n\r\n", "x".repeat(100));
        assert_eq!(
            first_error(long_ext.as_bytes()),
            ChunkedError::ExtensionsOrTrailersTooLarge
        );
        // The budget spans the whole body, not one chunk.
        let many: String = (0..20).map(|_| "1;abcd\r\na\r\n").collect::<String>() + "0\r\n\r\n";
        assert_eq!(
            first_error(many.as_bytes()),
            ChunkedError::ExtensionsOrTrailersTooLarge
        );
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "y".repeat(100));
        assert_eq!(
            first_error(long_trailer.as_bytes()),
            ChunkedError::ExtensionsOrTrailersTooLarge
        );
        assert_eq!(ChunkedError::ExtensionsOrTrailersTooLarge.status(), 400);
    }

    #[test]
    fn trailers_consumed_and_discarded() {
        let (data, rest) =
            decode_split(b"2\r\nhi\r\n0\r\nA: 1\r\nB-C: x y\r\n\r\nrest", &[], 64).unwrap();
        assert_eq!(data, b"hi");
        assert_eq!(rest, b"rest");
        assert_eq!(
            first_error(b"0\r\n folded\r\n\r\n"),
            ChunkedError::InvalidTrailer
        );
        assert_eq!(
            first_error(b"0\r\nX: a\x00b\r\n\r\n"),
            ChunkedError::InvalidTrailer
        );
        assert_eq!(first_error(b"1;a\x01\r\n"), ChunkedError::InvalidExtension);
    }

    #[test]
    fn errors_are_sticky() {
        let mut dec = ChunkedDecoder::new(8);
        let mut buf = BytesMut::from(&b"z"[..]);
        assert_eq!(dec.decode(&mut buf), Err(ChunkedError::InvalidSize));
        let mut buf = BytesMut::from(&b"0\r\n\r\n"[..]);
        assert_eq!(dec.decode(&mut buf), Err(ChunkedError::InvalidSize));
    }

    #[test]
    fn chunk_header_encoding() {
        let mut out = BytesMut::new();
        write_chunk_header(&mut out, 1);
        write_chunk_header(&mut out, 0xabc);
        write_chunk_header(&mut out, usize::MAX);
        let want = format!("1\r\nabc\r\n{:x}\r\n", usize::MAX);
        assert_eq!(&out[..], want.as_bytes());
    }
}
