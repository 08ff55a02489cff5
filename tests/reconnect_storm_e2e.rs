//! A gateway restart with many tunnels of distinct identities (issue 17,
//! "a reconnect storm is absorbed"): `anp-storm` (benches/storm/) holds
//! one token tunnel per identity and reconnects with the receiver's own
//! policy (`receiver::backoff`); a successor gateway joins the port with
//! `--takeover`, the old one drains (SIGTERM) and closes every tunnel with
//! 1001 and its spread hint (PROTOCOL.md §7.3); the successor paces the
//! handshakes (`handshake_rate`).
//!
//! What a user notices, asserted: every tunnel is back; and requests to a
//! sample of identities are served throughout. "Served throughout", with
//! the drain/takeover semantics: a request the old gateway accepted is
//! answered by it (its drain waits for it); a request that reaches the
//! successor before that identity's tunnel has come back waits
//! `no_tunnel_wait` and may then get 503 with Retry-After, the one refusal
//! that says "retry". So every logical request ends in a 200 with its
//! identity's body, after at most a few retries on a 503-with-Retry-After
//! or a connection the old gateway dropped while closing its listener; no
//! 404, 502 or 504, and no body of another identity, ever. The times are
//! printed (measured, never asserted).
//!
//! `ANP_STORM_TUNNELS` sets the count (default 10,000).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::procs::{Gateway, Proc};
use common::{client, wait_until};

const WAIT: Duration = Duration::from_secs(120);

fn tunnels() -> usize {
    std::env::var("ANP_STORM_TUNNELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// N token identities: `id{i}` with token `storm-token-{i}`, owning `/a{i}`.
/// Every tunnel comes from 127.0.0.1 here, where a fleet comes from N
/// addresses: the per-address cap on pending upgrades is lifted (the
/// global one, 1,024, stays).
fn config(port: u16, n: usize) -> String {
    let mut t = format!(
        "mode = \"gateway\"\n[logging]\nlevel = \"warn\"\nlog_dir = \"\"\naccess_log = false\n[gateway]\nhost = \"127.0.0.1\"\nport = {port}\nworkers = 2\nmax_connections = 40000\nshutdown_grace = 30\nno_tunnel_wait = 2\nmax_pending_upgrades_per_ip = 100000\n"
    );
    for i in 0..n {
        t += &format!(
            "[[gateway.auth.tokens]]\nname = \"id{i}\"\ntoken = \"storm-token-{i}\"\npaths = [\"/a{i}\"]\n"
        );
    }
    t
}

/// The `up=` of a `storm t_ms=… up=…` line.
fn field(line: &str, key: &str) -> Option<usize> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// One logical request's story.
#[derive(Debug)]
struct Outcome {
    identity: usize,
    /// Statuses before the 200 (0: no response, the connection failed).
    retried: Vec<u16>,
    /// Status and body of the last answer.
    last: (u16, String),
    took: Duration,
}

/// GET `/a{i}/probe` until a 200, retrying only what "retry" means (503
/// with Retry-After; no response at all), at most 20 times.
fn logical_request(gw: SocketAddr, i: usize) -> Outcome {
    let t0 = Instant::now();
    let path = format!("/a{i}/probe");
    let mut retried = Vec::new();
    loop {
        let r = client::try_request(
            gw,
            "GET",
            &path,
            &[("Host", "gw.test"), ("Connection", "close")],
            b"",
        );
        let (status, body, retry_after) = match r {
            Ok(r) => (r.status, r.body_text(), r.header("retry-after").is_some()),
            Err(_) => (0, String::new(), true),
        };
        if status == 200 || !retry_after || retried.len() == 20 {
            return Outcome {
                identity: i,
                retried,
                last: (status, body),
                took: t0.elapsed(),
            };
        }
        retried.push(status);
        // Not the Retry-After (seconds): the gateway's wait for a tunnel
        // already paced us; a short pause keeps the loop from spinning.
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ten_thousand_identities_come_back_after_a_takeover_and_are_served_throughout() {
    let n = tunnels();
    let port = free_port();
    let text = config(port, n);
    let mut a = Gateway::start_toml(&text);
    let gw = a.addr;
    let mut storm = Proc::start(
        "storm",
        env!("CARGO_BIN_EXE_anp-storm"),
        [
            "--gateway".to_owned(),
            gw.to_string(),
            "--tunnels".to_owned(),
            n.to_string(),
            "--start-rate".to_owned(),
            "5".to_owned(),
            "--token-prefix".to_owned(),
            "storm-token-".to_owned(),
        ],
        &[],
    );
    let t_start = Instant::now();
    storm.wait_line_within(&format!("all {n} tunnels up"), WAIT, |l| {
        field(l, "up") == Some(n)
    });
    eprintln!(
        "{n} tunnels up in {:?} (first start, staggered)",
        t_start.elapsed()
    );

    // Clients: a sample of identities, four at a time, all through the
    // restart.
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let sample: Vec<usize> = (0..200).map(|k| (k * 7919) % n).collect();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, outcomes, sample) = (stop.clone(), outcomes.clone(), sample.clone());
            thread::spawn(move || {
                let mut k = c;
                while !stop.load(Ordering::Relaxed) {
                    let o = logical_request(gw, sample[k % sample.len()]);
                    outcomes.lock().unwrap().push(o);
                    k += 4;
                }
            })
        })
        .collect();
    wait_until("some requests served before the restart", WAIT, || {
        outcomes.lock().unwrap().len() >= 20
    });

    // The restart: successor joins, the old one drains.
    let b = Gateway::start_toml_with(&text, &["--takeover"]);
    assert_eq!(b.addr, gw);
    let before = outcomes.lock().unwrap().len();
    let t0 = Instant::now();
    a.signal(libc::SIGTERM);
    let gone = storm.wait_line_within(
        &format!("{n} tunnels closed by the draining gateway"),
        WAIT,
        |l| field(l, "going_away").is_some_and(|g| g >= n),
    );
    let closed = t0.elapsed();
    let back = if field(&gone, "up") == Some(n) {
        gone
    } else {
        storm.wait_line_within(&format!("all {n} tunnels back"), WAIT, |l| {
            field(l, "up") == Some(n)
        })
    };
    let all_back = t0.elapsed();
    let status = a.proc.wait_exit(WAIT);
    assert!(
        status.success(),
        "the old gateway drains and exits 0: {status}"
    );
    // Requests keep being served on the successor alone.
    let at_back = outcomes.lock().unwrap().len();
    wait_until("more requests served after the storm", WAIT, || {
        outcomes.lock().unwrap().len() >= at_back + 20
    });
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    eprintln!(
        "SIGTERM → all {n} closed {closed:?}, all back {all_back:?} ({back}); requests during and after: {}",
        outcomes.lock().unwrap().len() - before
    );

    let outcomes = outcomes.lock().unwrap();
    let retried: Vec<&Outcome> = outcomes.iter().filter(|o| !o.retried.is_empty()).collect();
    let slowest = outcomes.iter().map(|o| o.took).max().unwrap();
    eprintln!(
        "{} logical requests, {} needed a retry, slowest {slowest:?}",
        outcomes.len(),
        retried.len()
    );
    for o in outcomes.iter() {
        assert_eq!(
            o.last,
            (200, format!("storm:{}:/a{}/probe", o.identity, o.identity)),
            "every request ends in its own identity's 200: {o:?}"
        );
        assert!(
            o.retried.iter().all(|s| *s == 503 || *s == 0),
            "only 503 + Retry-After (or no answer) is retried: {o:?}"
        );
    }
    drop(b);
}
