//! Helpers shared by the fuzz targets (`fuzz_targets/`): turning one fuzz
//! input into the shapes the parsers see on the wire — ANPX frames whose
//! CRCs are right (so mutations reach the TLV walk instead of dying at the
//! checksum), and a deterministic split of a byte stream into reads.
//!
//! Never: randomness that is not derived from the input (a finding must
//! replay from its file alone).

use std::ops::Range;

/// ANPX header length (PROTOCOL.md §2).
pub const ANPX_HEADER_LEN: usize = 24;

/// Rewrites `frame` so its header is one `decode_frame` accepts up to the
/// TLVs: magic, version, `total_len` and both CRCs are set; type, flags,
/// reserved, padding and the body are kept as fuzzed. Shorter inputs are
/// padded to a full header first.
pub fn fix_anpx_frame(frame: &mut Vec<u8>) {
    if frame.len() < ANPX_HEADER_LEN {
        frame.resize(ANPX_HEADER_LEN, 0);
    }
    frame[0..4].copy_from_slice(b"ANPX");
    frame[4] = 1;
    let total = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    frame[8..12].copy_from_slice(&total.to_be_bytes());
    let header_crc = crc32fast::hash(&frame[..12]);
    frame[12..16].copy_from_slice(&header_crc.to_be_bytes());
    let body_crc = crc32fast::hash(&frame[ANPX_HEADER_LEN..]);
    frame[16..20].copy_from_slice(&body_crc.to_be_bytes());
}

/// Splits `data` into records, each a little-endian u16 length and that
/// many bytes (a short last record takes what is left). The format the
/// multi-message targets use; `fuzz/make_seeds.py` writes it.
pub fn records(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let n = n.min(rest.len());
        out.push(&rest[..n]);
        data = &rest[n..];
    }
    out
}

/// Cut points for feeding `len` bytes as several reads, derived from
/// `seed`: piece sizes cycle through small values (1..=17 bytes) and the
/// occasional large one, so both byte-at-a-time resumption and whole
/// frames in one read are exercised.
pub fn pieces(len: usize, seed: u8) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    // xorshift32, seeded from the input: deterministic per input.
    let mut x = 0x9E37_79B9u32 ^ (u32::from(seed) << 8 | u32::from(seed)) ^ len as u32;
    if x == 0 {
        x = 1;
    }
    let mut at = 0;
    while at < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let step = if x % 8 == 0 {
            (x >> 8) as usize % 512 + 1
        } else {
            (x >> 8) as usize % 17 + 1
        };
        let end = (at + step).min(len);
        out.push(at..end);
        at = end;
    }
    out
}

/// Whether `inner` lies within `outer` (pointer ranges): a borrowed field
/// must be a slice of the buffer it was parsed from.
pub fn within(outer: &[u8], inner: &[u8]) -> bool {
    let o = outer.as_ptr_range();
    let i = inner.as_ptr_range();
    inner.is_empty() || (o.start <= i.start && i.end <= o.end)
}

/// A range is well-formed and ends at or before `end`.
pub fn range_within(r: &Range<usize>, end: usize) -> bool {
    r.start <= r.end && r.end <= end
}
