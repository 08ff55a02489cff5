//! Every case of the reference vectors (shared/anpx-vectors/vectors.json,
//! frames from the Python reference encoder; PROTOCOL.md §2–5) through the
//! decoder and the reassembler. Counts cases so none is skipped silently.

use std::collections::BTreeMap;

use anp_proxy::protocol::anpx::{decode_frame, FrameType, Limits, Message, Reassembler};
use bytes::Bytes;
use serde_json::Value;
use sha2::{Digest, Sha256};

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/anpx-vectors.json");

const LIMITS: Limits = Limits {
    max_message_size: 16 << 20,
    max_assemblies: 64,
};

fn load() -> Vec<Value> {
    let text = std::fs::read_to_string(VECTORS).expect("vectors file");
    let doc: Value = serde_json::from_str(&text).expect("vectors JSON");
    doc["cases"].as_array().expect("cases array").clone()
}

fn frames(case: &Value) -> Vec<Bytes> {
    case["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .map(|f| Bytes::from(hex::decode(f.as_str().expect("hex string")).expect("hex")))
        .collect()
}

fn str_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .expect("object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("string").to_owned()))
        .collect()
}

/// Pairs as a map, refusing duplicate names (the reference has none).
fn pair_map(pairs: &[(String, String)]) -> BTreeMap<String, String> {
    let map: BTreeMap<_, _> = pairs.iter().cloned().collect();
    assert_eq!(map.len(), pairs.len(), "duplicate keys in {pairs:?}");
    map
}

fn check_body(name: &str, expect: &Value, body: &[u8]) {
    if let Some(h) = expect.get("body_hex") {
        assert_eq!(hex::encode(body), h.as_str().unwrap(), "{name}: body");
    } else {
        let len = expect["body_len"].as_u64().expect("body_len or body_hex");
        assert_eq!(body.len() as u64, len, "{name}: body length");
        let sha = hex::encode(Sha256::digest(body));
        assert_eq!(
            sha,
            expect["body_sha256"].as_str().unwrap(),
            "{name}: body sha256"
        );
    }
}

fn check_message(name: &str, kind: &str, expect: &Value, msg: &Message) {
    assert_eq!(
        msg.request_id(),
        expect["request_id"].as_str().unwrap(),
        "{name}: request_id"
    );
    match (kind, msg) {
        ("request", Message::Request { meta, body, .. }) => {
            assert_eq!(
                meta.method,
                expect["method"].as_str().unwrap(),
                "{name}: method"
            );
            assert_eq!(meta.path, expect["path"].as_str().unwrap(), "{name}: path");
            assert_eq!(
                pair_map(&meta.headers),
                str_map(&expect["headers"]),
                "{name}: headers"
            );
            assert_eq!(
                pair_map(&meta.query),
                str_map(&expect["query"]),
                "{name}: query"
            );
            check_body(name, expect, body);
        }
        ("response", Message::Response { meta, body, .. }) => {
            assert_eq!(
                u64::from(meta.status),
                expect["status"].as_u64().unwrap(),
                "{name}: status"
            );
            assert_eq!(
                meta.reason,
                expect["reason"].as_str().unwrap(),
                "{name}: reason"
            );
            assert_eq!(
                pair_map(&meta.headers),
                str_map(&expect["headers"]),
                "{name}: headers"
            );
            check_body(name, expect, body);
        }
        ("error", Message::Error { message, .. }) => {
            assert_eq!(
                message,
                expect["message"].as_str().unwrap(),
                "{name}: message"
            );
        }
        _ => panic!("{name}: expected a {kind}, got {msg:?}"),
    }
}

/// Pushes frames in the given order; only the last may complete.
fn reassemble(name: &str, frames: &[Bytes]) -> Message {
    let mut r = Reassembler::new(LIMITS);
    let (last, rest) = frames.split_last().expect("at least one frame");
    for f in rest {
        let out = r.push(f.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(out.is_none(), "{name}: completed before the last frame");
    }
    let msg = r
        .push(last.clone())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(r.is_empty(), "{name}: state left behind");
    msg.unwrap_or_else(|| panic!("{name}: not complete after the last frame"))
}

#[test]
fn all_vectors() {
    let cases = load();
    assert!(!cases.is_empty());
    let (mut valid, mut invalid) = (0, 0);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let kind = case["kind"].as_str().unwrap();
        let expect = &case["expect"];
        let frames = frames(case);
        if case["valid"].as_bool().unwrap() {
            if let Some(n) = expect.get("frames") {
                assert_eq!(
                    frames.len() as u64,
                    n.as_u64().unwrap(),
                    "{name}: frame count"
                );
            }
            let want_ty = match kind {
                "request" => FrameType::Request,
                "response" => FrameType::Response,
                "error" => FrameType::Error,
                other => panic!("{name}: unknown kind {other}"),
            };
            for f in &frames {
                let d = decode_frame(f).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(d.ty, want_ty, "{name}");
                assert_eq!(d.request_id, expect["request_id"].as_str(), "{name}");
                assert_eq!(d.chunked, frames.len() > 1, "{name}: chunked flag");
            }
            check_message(name, kind, expect, &reassemble(name, &frames));
            if frames.len() > 1 {
                let reversed: Vec<Bytes> = frames.iter().rev().cloned().collect();
                check_message(name, kind, expect, &reassemble(name, &reversed));
            }
            valid += 1;
        } else {
            let want = expect["error"].as_str().unwrap();
            assert_eq!(frames.len(), 1, "{name}: invalid cases are single frames");
            let e = decode_frame(&frames[0]).expect_err(name);
            assert_eq!(e.kind(), want, "{name}: decode_frame error {e}");
            let e = Reassembler::new(LIMITS)
                .push(frames[0].clone())
                .expect_err(name);
            assert_eq!(e.kind(), want, "{name}: push error {e}");
            assert_eq!(e.request_id(), None, "{name}");
            invalid += 1;
        }
    }
    assert_eq!(valid + invalid, cases.len(), "every case checked");
    assert!(
        valid > 0 && invalid > 0,
        "both sides of the decoder exercised"
    );
}
