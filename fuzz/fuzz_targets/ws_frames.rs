//! The WebSocket frame decoder (`ws::Decoder`, RFC 6455 §5) in both roles,
//! fed the whole input at once and in pieces cut at input-derived positions.
//!
//! Input: a config byte (bit 0: role server/client; bits 1–2: limits;
//! bits 3–7: split seed), then the byte stream.
//! Invariants beyond "no panic": both feedings give the same events and the
//! same error; `needed()` is ≥ 1 after `Ok(None)` and really is a lower
//! bound (fewer new bytes never make progress); events respect the limits
//! (control payloads ≤ 125, messages ≤ `max_message`, text is UTF-8); the
//! decoder never consumes more than it was given.
#![no_main]

use anp_proxy::ws::{Decoder, Event, Limits, Role, MAX_CONTROL_PAYLOAD};
use anp_proxy_fuzz::pieces;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

const LIMITS: [Limits; 4] = [
    Limits {
        max_frame_payload: 125,
        max_message: 256,
        max_fragments: 4,
    },
    Limits {
        max_frame_payload: 16,
        max_message: 64,
        max_fragments: 2,
    },
    Limits {
        max_frame_payload: 1024,
        max_message: 4096,
        max_fragments: 16,
    },
    Limits {
        max_frame_payload: 1 << 20,
        max_message: 1 << 20,
        max_fragments: 64,
    },
];

fuzz_target!(|data: &[u8]| {
    let Some((&config, stream)) = data.split_first() else {
        return;
    };
    let role = if config & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let limits = LIMITS[usize::from((config >> 1) & 3)];
    let whole = run(role, limits, stream, &[0..stream.len()]);
    let split = run(role, limits, stream, &pieces(stream.len(), config >> 3));
    assert_eq!(whole, split, "split feeding changed the result");
});

/// Events, then the error (close code and text) if decoding failed.
type Outcome = (Vec<Event>, Option<(u16, String)>);

fn run(role: Role, limits: Limits, input: &[u8], cuts: &[std::ops::Range<usize>]) -> Outcome {
    let mut dec = Decoder::new(role, limits);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    // Bytes the decoder said it needs at least, and bytes added since.
    let mut need = 0;
    for cut in cuts {
        buf.extend_from_slice(&input[cut.clone()]);
        let added = cut.len();
        loop {
            let before = buf.len();
            let result = dec.decode(&mut buf);
            assert!(buf.len() <= before, "decode grew the buffer");
            if added < need {
                assert!(
                    matches!(result, Ok(None)),
                    "progress after {added} of the {need} bytes needed() asked for: {result:?}"
                );
            }
            need = 0;
            match result {
                Ok(Some(ev)) => {
                    check_event(&ev, &limits);
                    events.push(ev);
                }
                Ok(None) => {
                    need = dec.needed();
                    assert!(need >= 1, "needed() is 0 after Ok(None)");
                    break;
                }
                Err(e) => return (events, Some((e.close_code(), e.to_string()))),
            }
        }
    }
    (events, None)
}

fn check_event(ev: &Event, limits: &Limits) {
    match ev {
        Event::Ping(p) | Event::Pong(p) => assert!(p.len() <= MAX_CONTROL_PAYLOAD),
        Event::Binary(m) => assert!(m.len() <= limits.max_message),
        Event::Text(m) => {
            assert!(m.len() <= limits.max_message);
            assert!(std::str::from_utf8(m).is_ok(), "text event is not UTF-8");
        }
        Event::Close { code, reason } => {
            assert!(reason.len() + 2 <= MAX_CONTROL_PAYLOAD);
            assert!(code.is_some() || reason.is_empty());
        }
    }
}
