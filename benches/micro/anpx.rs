//! ANPX codec micro-benches (issue #4, PROTOCOL.md §2–5): encode and decode
//! of one small frame, and a 64 KiB body as a whole message (throughput in
//! GB/s: the CRC over the body dominates). Numbers go to criterion's report,
//! never into asserts. Run: `make bench-micro` or `cargo bench --bench anpx`.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use anp_proxy::protocol::anpx::{
    decode_frame, encode_frame, encode_message, FrameType, Limits, MetaRef, Reassembler,
    RequestMeta, ResponseMeta,
};

const RID: &str = "6f1c2a7e-93b4-4f0e-9a51-0c8d2b7e4a10";

fn request_meta_json() -> Vec<u8> {
    let meta = RequestMeta {
        method: "GET".into(),
        path: "/api/v1/items/42".into(),
        headers: vec![
            ("host".into(), "example.org".into()),
            ("user-agent".into(), "bench/1.0".into()),
            ("accept".into(), "*/*".into()),
        ],
        query: vec![("size".into(), "1024".into())],
        raw_target: None,
        header_list: None,
    };
    let mut out = Vec::new();
    meta.to_json(&mut out);
    out
}

fn response_meta_json() -> Vec<u8> {
    let meta = ResponseMeta {
        status: 200,
        reason: "OK".into(),
        headers: vec![
            ("content-type".into(), "application/octet-stream".into()),
            ("content-length".into(), "65536".into()),
        ],
        header_list: None,
    };
    let mut out = Vec::new();
    meta.to_json(&mut out);
    out
}

fn limits() -> Limits {
    Limits {
        max_message_size: 64 << 20,
        max_assemblies: 1024,
    }
}

fn small_frame(c: &mut Criterion) {
    let meta = request_meta_json();
    let body = vec![b'x'; 128];
    let mut g = c.benchmark_group("anpx/frame-128B");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| {
        let mut out = BytesMut::with_capacity(4096);
        b.iter(|| {
            out.clear();
            encode_frame(
                FrameType::Request,
                black_box(RID),
                Some(MetaRef::Request(&meta)),
                black_box(&body),
                None,
                &mut out,
            );
            black_box(out.len())
        })
    });
    let mut frame = BytesMut::new();
    encode_frame(
        FrameType::Request,
        RID,
        Some(MetaRef::Request(&meta)),
        &body,
        None,
        &mut frame,
    );
    let frame = frame.freeze();
    g.bench_function("decode_frame", |b| {
        b.iter(|| black_box(decode_frame(black_box(&frame)).expect("valid frame")).body)
    });
    g.bench_function("decode+meta (reassembler)", |b| {
        let mut r = Reassembler::new(limits());
        b.iter(|| {
            black_box(
                r.push(frame.clone())
                    .expect("valid")
                    .expect("whole message"),
            )
        })
    });
    let resp = response_meta_json();
    g.bench_function("ResponseMeta::from_json", |b| {
        b.iter(|| black_box(ResponseMeta::from_json(black_box(&resp)).expect("valid")))
    });
    g.finish();
}

fn body_64k(c: &mut Criterion) {
    let meta = response_meta_json();
    let body = vec![b'x'; 64 * 1024];
    let mut g = c.benchmark_group("anpx/body-64KiB");
    g.throughput(Throughput::Bytes(body.len() as u64));
    // chunk_size 64 KiB (the default): the body does not fit one frame, so
    // this is the chunked path (2 frames) the gateway really takes.
    for chunk in [65_536usize, 1 << 20] {
        g.bench_function(format!("encode_message chunk={chunk}"), |b| {
            let mut out = Vec::with_capacity(4);
            b.iter(|| {
                out.clear();
                encode_message(
                    FrameType::Response,
                    RID,
                    Some(MetaRef::Response(&meta)),
                    black_box(&body),
                    chunk,
                    &mut out,
                );
                black_box(out.len())
            })
        });
        let mut frames = Vec::new();
        encode_message(
            FrameType::Response,
            RID,
            Some(MetaRef::Response(&meta)),
            &body,
            chunk,
            &mut frames,
        );
        let frames: Vec<Bytes> = frames.into_iter().map(BytesMut::freeze).collect();
        g.bench_function(
            format!("reassemble chunk={chunk} ({} frames)", frames.len()),
            |b| {
                let mut r = Reassembler::new(limits());
                b.iter(|| {
                    let mut done = None;
                    for f in &frames {
                        done = r.push(f.clone()).expect("valid frame");
                    }
                    black_box(done.expect("message complete"))
                })
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the machine is shared; criterion's defaults take minutes.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = small_frame, body_64k
}
criterion_main!(benches);
