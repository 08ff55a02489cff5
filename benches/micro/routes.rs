//! Route lookup (longest path-segment prefix, one hash probe per segment)
//! at 100 and at 100,000 prefixes: it must stay flat. And the registry
//! poller's two reads on a 100,000-row SQLite table: the poll that finds
//! nothing changed (one row of `registry_meta`) against the full read every
//! poll used to make. Run: `make bench-micro` or `cargo bench --bench routes`.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use anp_proxy::gateway::routes::RouteTable;
use anp_proxy::registry::sqlite::SqliteRegistry;
use anp_proxy::registry::Registry;

fn table(n: usize) -> RouteTable {
    let mut t = RouteTable::new();
    for i in 0..n {
        let identity: Arc<str> = format!("agent-{}", i % 97).into();
        t.insert(&format!("/tenant{}/svc{}", i % 100, i), identity);
    }
    t
}

fn lookup(c: &mut Criterion) {
    for n in [100, 100_000] {
        let t = table(n);
        let mut g = c.benchmark_group(format!("routes/lookup {n}"));
        g.throughput(Throughput::Elements(1));
        let cases = [
            ("exact", "/tenant42/svc42"),
            ("3 segments deeper", "/tenant42/svc42/api/v1/items"),
            ("8 segments deeper", "/tenant42/svc42/a/b/c/d/e/f/g/h"),
            ("miss (walks to root)", "/nobody/here/at/all/x/y"),
        ];
        for (name, path) in cases {
            g.bench_function(name, |b| {
                b.iter(|| black_box(t.lookup(black_box(path))).is_some())
            });
        }
        g.bench_function("owns_any (tunnel upgrade)", |b| {
            b.iter(|| black_box(t.owns_any(black_box("agent-42"))))
        });
        g.finish();
    }
    c.bench_function("routes/build 100k", |b| {
        b.iter(|| black_box(table(100_000)).len())
    });
}

/// A registry file with `n` rows, written in one transaction (the CLI
/// would log each; the poller's reads are what is measured here).
fn registry(dir: &std::path::Path, n: usize) -> Registry {
    let path = dir.join("routes.db");
    let reg = SqliteRegistry::open(&path).unwrap();
    let mut conn = rusqlite::Connection::open(&path).unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut st = tx
            .prepare("INSERT INTO did_proxy_path (did, proxy_path) VALUES (?1, ?2)")
            .unwrap();
        for i in 0..n {
            st.execute((
                format!("did:wba:a.example:agent{i}"),
                format!("/agents/a{i}/"),
            ))
            .unwrap();
        }
    }
    tx.commit().unwrap();
    Registry::from_backend(Box::new(reg))
}

fn poll(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut reg = registry(dir.path(), 100_000);
    let mut g = c.benchmark_group("registry/poll 100k rows");
    g.sample_size(20);
    g.bench_function("unchanged (version row)", |b| {
        b.iter(|| black_box(reg.version().unwrap()))
    });
    g.bench_function("full read (before)", |b| {
        b.iter(|| black_box(reg.list_all().unwrap()).len())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the machine is shared; criterion's defaults take minutes.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = lookup, poll
}
criterion_main!(benches);
