//! DID-WBA verification as a tunnel upgrade does it (issue 17: "signature
//! checks cheap enough to do at full rate on every core"): `precheck`
//! (header parse, time window, nonce) plus `finish` (document checks, key
//! from the document, signature, nonce spent) against a document already
//! in hand (the resolver's cache hit). One iteration is one handshake's
//! verification; criterion's rate is handshakes/s on one core. Signing
//! (the receiver's side) happens outside the timed part.
//! Run: `make bench-micro` or `cargo bench --bench didwba`.

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use anp_proxy::auth::didwba::create::{self, KeyKind};
use anp_proxy::auth::didwba::{sign, time, DidRequest, DidSigner, Verifier, VerifierConfig};

fn verify(c: &mut Criterion) {
    let mut g = c.benchmark_group("didwba/verify (cache hit)");
    g.throughput(Throughput::Elements(1));
    for (name, kind, bound) in [
        ("secp256k1 (agent-connect)", KeyKind::Secp256k1, false),
        ("ed25519 key-bound (anp 1.x)", KeyKind::Ed25519, true),
    ] {
        let key = create::generate(kind);
        let (_, doc) = create::document_for("did:wba:gw.test:agents:bench", &key, bound).unwrap();
        let signer = DidSigner::new(&doc, key).unwrap();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                // A fresh verifier and fresh nonces: every proof is new.
                let v = Verifier::new(VerifierConfig {
                    nonce_cache_size: iters as usize + 16,
                    ..VerifierConfig::default()
                });
                let now = time::now_unix();
                let ts = time::format_utc(now);
                let headers: Vec<String> = (0..iters)
                    .map(|_| signer.didwba_header("gw.test", &sign::fresh_nonce(), &ts))
                    .collect();
                let owns = |_: &str| true;
                let start = Instant::now();
                for h in &headers {
                    let hs = [("Authorization", h.as_bytes())];
                    let req = DidRequest {
                        method: "GET",
                        target: "/ws",
                        host: Some("gw.test"),
                        tls: false,
                        headers: &hs,
                    };
                    let pre = v.precheck(&req, now, &owns).unwrap();
                    v.finish(&pre, &req, &doc, now).unwrap();
                    black_box(&pre);
                }
                start.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the machine is shared.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = verify
}
criterion_main!(benches);
