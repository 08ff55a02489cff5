//! ANPX reassembly (PROTOCOL.md §5) under small limits.
//!
//! Input: one config byte, then records (`u16` LE length + bytes), each one
//! WebSocket binary message pushed in order. Config bit 0 clear: every
//! record's header is fixed up (`fix_anpx_frame`) so frames reach the
//! reassembler; set: records are pushed as they are. Bits 1–3 pick
//! `max_assemblies` (1..=8), bits 4–7 `max_message_size` (64 B..2 KiB and
//! two larger values).
//! Invariants: never more partial messages than `max_assemblies`; a
//! completed message's body fits `max_message_size` and its request id is
//! the id of the frame that completed it; an error for one request never
//! grows the partial table.
#![no_main]

use anp_proxy::protocol::anpx::{decode_frame, Limits, Message, Reassembler};
use anp_proxy_fuzz::{fix_anpx_frame, records};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

const SIZES: [usize; 16] = [
    64,
    100,
    128,
    200,
    256,
    300,
    512,
    600,
    700,
    1000,
    1024,
    1500,
    2048,
    4096,
    65536,
    1 << 20,
];

fuzz_target!(|data: &[u8]| {
    let Some((&config, rest)) = data.split_first() else {
        return;
    };
    let fix = config & 1 == 0;
    let limits = Limits {
        max_message_size: SIZES[usize::from(config >> 4)],
        max_assemblies: usize::from((config >> 1) & 7) + 1,
    };
    let mut r = Reassembler::new(limits);
    for rec in records(rest) {
        let mut frame = rec.to_vec();
        if fix {
            fix_anpx_frame(&mut frame);
        }
        let id = decode_frame(&frame)
            .ok()
            .and_then(|f| f.request_id.map(str::to_owned));
        let before = r.len();
        match r.push(Bytes::from(frame)) {
            Ok(Some(msg)) => {
                assert_eq!(Some(msg.request_id()), id.as_deref());
                if let Message::Request { body, .. } | Message::Response { body, .. } = &msg {
                    assert!(body.len() <= limits.max_message_size, "body over the limit");
                }
                assert!(
                    r.len() <= before,
                    "completing a message added partial state"
                );
            }
            Ok(None) => assert!(r.len() <= before + 1),
            Err(_) => assert!(r.len() <= before, "an error added partial state"),
        }
        assert!(
            r.len() <= limits.max_assemblies,
            "more assemblies than the limit"
        );
        if let (Some(id), true) = (&id, rec.first() == Some(&0xFF)) {
            // Occasionally drop state the way a cancelled request does.
            r.forget(id);
        }
    }
});
