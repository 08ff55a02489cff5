//! The chunked body decoder (`http::ChunkedDecoder`, RFC 9112 §7.1), fed
//! the whole input at once and in pieces cut at input-derived positions.
//!
//! Input: a config byte (bits 0–1: extension/trailer budget 0, 8, 64 or
//! 4096; bits 2–7: split seed), then the body.
//! Invariants beyond "no panic": resumable at every byte boundary — both
//! feedings give the same data, the same outcome and the same number of
//! bytes consumed; "need more" leaves nothing unread; data out never
//! exceeds bytes in and no data step is empty; a finished or failed decoder
//! stays so; a decoded body re-framed with `write_chunk_header` +
//! `LAST_CHUNK` decodes to itself.
#![no_main]

use anp_proxy::http::{write_chunk_header, ChunkedDecoder, ChunkedStep, LAST_CHUNK};
use anp_proxy_fuzz::pieces;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
enum End {
    /// Done after consuming this many bytes of the input.
    Done(usize),
    Failed(anp_proxy::http::ChunkedError),
    NeedMore,
}

const BUDGETS: [usize; 4] = [0, 8, 64, 4096];

fuzz_target!(|data: &[u8]| {
    let Some((&config, body)) = data.split_first() else {
        return;
    };
    let budget = BUDGETS[usize::from(config & 3)];
    let whole = run(body, budget, &[0..body.len()]);
    let split = run(body, budget, &pieces(body.len(), config >> 2));
    assert_eq!(whole, split, "split feeding changed the result");

    let (out, end) = whole;
    assert!(out.len() <= body.len(), "more data out than bytes in");
    if let End::Done(_) = end {
        let mut framed = BytesMut::new();
        if !out.is_empty() {
            write_chunk_header(&mut framed, out.len());
            framed.extend_from_slice(&out);
            framed.extend_from_slice(b"\r\n");
        }
        framed.extend_from_slice(LAST_CHUNK);
        let n = framed.len();
        let again = run(&framed, 0, &[0..n]);
        assert_eq!(
            again,
            (out, End::Done(n)),
            "re-framed body did not decode to itself"
        );
    }
});

/// Feeds `input` piece by piece, decoding as far as possible after each.
fn run(input: &[u8], budget: usize, cuts: &[std::ops::Range<usize>]) -> (Vec<u8>, End) {
    let mut dec = ChunkedDecoder::new(budget);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    for cut in cuts {
        buf.extend_from_slice(&input[cut.clone()]);
        fed = cut.end;
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(ChunkedStep::Data(d)) => {
                    assert!(!d.is_empty(), "empty data step");
                    assert!(d.len() <= before);
                    out.extend_from_slice(&d);
                }
                Ok(ChunkedStep::NeedMore) => {
                    // Framing bytes are consumed as they are read: nothing
                    // is left behind for the next read to re-scan.
                    assert!(buf.is_empty(), "NeedMore with {} bytes unread", buf.len());
                    break;
                }
                Ok(ChunkedStep::Done) => {
                    assert!(dec.is_done());
                    let consumed = fed - buf.len();
                    assert_eq!(
                        dec.decode(&mut buf),
                        Ok(ChunkedStep::Done),
                        "Done is not sticky"
                    );
                    return (out, End::Done(consumed));
                }
                Err(e) => {
                    assert_eq!(
                        dec.decode(&mut buf),
                        Err(e.clone()),
                        "failure is not sticky"
                    );
                    return (out, End::Failed(e));
                }
            }
        }
    }
    assert_eq!(fed, input.len());
    (out, End::NeedMore)
}
