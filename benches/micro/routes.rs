//! Route lookup with 10,000 prefixes (longest path-segment prefix, one hash
//! probe per segment): hits at several depths and a miss that walks every
//! segment. Run: `make bench-micro` or `cargo bench --bench routes`.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use anp_proxy::gateway::routes::RouteTable;

fn table(n: usize) -> RouteTable {
    let mut t = RouteTable::new();
    for i in 0..n {
        let identity: Arc<str> = format!("agent-{}", i % 97).into();
        t.insert(&format!("/tenant{}/svc{}", i % 100, i), identity);
    }
    t
}

fn lookup(c: &mut Criterion) {
    let t = table(10_000);
    let mut g = c.benchmark_group("routes/lookup 10k");
    g.throughput(Throughput::Elements(1));
    let cases = [
        ("exact", "/tenant42/svc4242"),
        ("3 segments deeper", "/tenant42/svc4242/api/v1/items"),
        ("8 segments deeper", "/tenant42/svc4242/a/b/c/d/e/f/g/h"),
        ("miss (walks to root)", "/nobody/here/at/all/x/y"),
    ];
    for (name, path) in cases {
        g.bench_function(name, |b| {
            b.iter(|| black_box(t.lookup(black_box(path))).is_some())
        });
    }
    g.finish();
    c.bench_function("routes/build 10k", |b| {
        b.iter(|| black_box(table(10_000)).len())
    });
}

criterion_group! {
    name = benches;
    // Short runs: the machine is shared; criterion's defaults take minutes.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = lookup
}
criterion_main!(benches);
