//! WebSocket framing micro-benches (RFC 6455 §5): header encoding, the
//! masking XOR in GB/s, and decoding a masked binary frame the way the
//! gateway receives it from a receiver (Role::Server, unmask in place).
//! Run: `make bench-micro` or `cargo bench --bench ws`.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use anp_proxy::ws::{apply_mask, encode_header, Decoder, Event, Limits, OpCodeKind, Role};

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn limits() -> Limits {
    Limits {
        max_frame_payload: 16 << 20,
        max_message: 16 << 20,
        max_fragments: 1024,
    }
}

fn header(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws/encode_header");
    g.throughput(Throughput::Elements(1));
    for (name, len, mask) in [
        ("125B server", 125usize, None),
        ("64KiB server", 65_536, None),
        ("64KiB client (masked)", 65_536, Some(KEY)),
    ] {
        g.bench_function(name, |b| {
            let mut out = BytesMut::with_capacity(64);
            b.iter(|| {
                out.clear();
                encode_header(&mut out, OpCodeKind::Binary, true, black_box(len), mask);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn mask(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws/apply_mask");
    for len in [128usize, 1024, 65_536, 1 << 20] {
        let mut buf = vec![0xa5u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), KEY))
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws/decode masked binary");
    for len in [128usize, 1024, 65_536] {
        // One masked client frame, as the gateway reads it.
        let mut frame = BytesMut::new();
        encode_header(&mut frame, OpCodeKind::Binary, true, len, Some(KEY));
        let start = frame.len();
        frame.extend_from_slice(&vec![b'x'; len]);
        apply_mask(&mut frame[start..], KEY);
        let frame = frame.freeze();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, _| {
            let mut dec = Decoder::new(Role::Server, limits());
            let mut buf = BytesMut::with_capacity(frame.len());
            b.iter(|| {
                // The copy stands in for the socket read that fills `buf`.
                buf.clear();
                buf.extend_from_slice(&frame);
                match dec.decode(&mut buf).expect("valid frame") {
                    Some(Event::Binary(p)) => black_box(p.len()),
                    other => panic!("unexpected {other:?}"),
                }
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the machine is shared; criterion's defaults take minutes.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = header, mask, decode
}
criterion_main!(benches);
