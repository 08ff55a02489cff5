//! Fault injection (issue #6, "Faults"): real `anp-proxy gateway` and
//! `anp-proxy receiver` processes, killed, stopped and flooded while real
//! clients use them. Each test asserts the outcome **and** that nothing
//! beyond what must be lost is lost:
//!
//! 1. receiver SIGKILLed under load: only requests in flight on its tunnels
//!    fail (502); requests arriving while no tunnel is connected get 503 with
//!    `Retry-After` (DESIGN.md's status table: "route known, no tunnel
//!    connected"); after a new receiver connects every request succeeds on
//!    the same keep-alive client connections; the gateway's memory returns
//!    to its baseline;
//! 2. gateway SIGKILLed: the receiver backs off exponentially (its log says
//!    how long it waits each time) and reconnects by itself to a new gateway
//!    on the same port;
//! 3. receiver SIGSTOPped (stops reading): its requests end in 504 after
//!    `timeout` while another identity's tunnel is served throughout, and
//!    64 MiB of uploads aimed at the stopped tunnel do not pile up in the
//!    gateway;
//! 4. 10,000 client connections held open (idle, keep-alive after a
//!    request, mid-head, mid-body), then closed: the gateway's descriptors
//!    return to their count before.
//!
//! No sleeps as synchronisation: every wait polls a condition (a stdout
//! line, `/health`, `/proc`, a counter) with a generous deadline; no
//! stopwatch thresholds. The tests take turns (one lock): they load a
//! 2-core machine and measure the gateway's memory and descriptors.

mod common;

use common::client::{self, build_request, Conn};
use common::sys::{self, mib};
use common::{wait_until, App, Gateway, GatewayConfig, Receiver, ALICE_TOKEN, BOB_TOKEN};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Deadline for things that should happen in seconds (hang guard only).
const WAIT: Duration = Duration::from_secs(120);

/// The fault tests run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tunnels the gateway counts, from `GET /health` on its admin port (the
/// public one answers a bare `ok`).
fn health_tunnels(admin: SocketAddr) -> u64 {
    let r = client::request(admin, "GET", "/health", &[], &[]);
    assert_eq!(
        r.status,
        200,
        "GET /health: expected 200, got {}",
        r.summary()
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("GET /health: expected JSON, got {}: {e}", r.summary()));
    v["tunnels"]
        .as_u64()
        .unwrap_or_else(|| panic!("GET /health: expected a `tunnels` number in {v}"))
}

// ------------------------------------------------- 1. receiver killed

/// One request made by a load client.
#[derive(Clone, Debug)]
struct Rec {
    client: usize,
    start: Instant,
    end: Instant,
    /// The status, or the I/O error that replaced a response.
    outcome: Result<u16, String>,
    retry_after: bool,
}

struct Load {
    recs: Arc<Mutex<Vec<Rec>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// `clients` threads, each looping POSTs with a body unique to the
    /// request on one keep-alive connection (a new one only after an I/O
    /// error, which is recorded). A 200 must echo that exact body: a
    /// response delivered to the wrong client fails the test.
    fn start(gw: SocketAddr, clients: usize, tag: &'static str) -> Load {
        let recs = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|c| {
                let (recs, stop) = (recs.clone(), stop.clone());
                thread::spawn(move || {
                    let mut conn = Conn::connect(gw);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let target = format!("/alice/{tag}/{c}/{n}");
                        let body = format!("{target};").repeat(4096 / (target.len() + 1));
                        let start = Instant::now();
                        let got = conn
                            .send("POST", &target, &[], body.as_bytes())
                            .and_then(|_| conn.read());
                        let end = Instant::now();
                        let (outcome, retry_after) = match &got {
                            Ok(r) => {
                                if r.status == 200 {
                                    assert!(
                                        r.body == body.as_bytes(),
                                        "client {c}: POST {target}: expected its own body echoed, got {}",
                                        r.summary()
                                    );
                                }
                                (Ok(r.status), r.header("retry-after").is_some())
                            }
                            Err(e) => (Err(e.to_string()), false),
                        };
                        let failed = outcome != Ok(200);
                        // The gateway closes after refusing a request whose
                        // body it did not read (it says so): a new one then.
                        let closed = outcome.is_err()
                            || got.as_ref().is_ok_and(|r| {
                                r.header("connection")
                                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                            });
                        recs.lock().unwrap().push(Rec {
                            client: c,
                            start,
                            end,
                            outcome,
                            retry_after,
                        });
                        if closed {
                            conn = Conn::connect(gw);
                        }
                        if failed {
                            // A client backing off a little after a 5xx
                            // (not synchronisation: it keeps 32 clients
                            // from flooding a 2-core machine with 503s).
                            thread::sleep(Duration::from_millis(5));
                        }
                    }
                })
            })
            .collect();
        Load {
            recs,
            stop,
            threads,
        }
    }

    /// Waits until every client has `n` successes that started after `since`.
    fn wait_each_ok(&self, clients: usize, n: usize, since: Instant, what: &str) {
        wait_until(what, WAIT, || {
            let recs = self.recs.lock().unwrap();
            let mut per = vec![0usize; clients];
            for r in recs.iter() {
                if r.start > since && r.outcome == Ok(200) {
                    per[r.client] += 1;
                }
            }
            per.iter().all(|k| *k >= n)
        });
    }

    fn finish(self) -> Vec<Rec> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a load client panicked");
        }
        Arc::try_unwrap(self.recs)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_else(|a| a.lock().unwrap().clone())
    }
}

fn tally(recs: &[Rec]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in recs {
        let k = match &r.outcome {
            Ok(s) => s.to_string(),
            Err(_) => "io-error".to_string(),
        };
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

#[test]
fn receiver_killed_under_load_loses_only_in_flight_requests() {
    let _turn = serial();
    const CLIENTS: usize = 32;
    const HELD: usize = 4;
    /// Allocator caches and pools are not leaks: the gateway may keep this
    /// much more than after the same load without faults.
    const SLACK_KIB: u64 = 8 * 1024;

    let cfg = GatewayConfig {
        // No ping tick during the test: what a dead tunnel held (socket,
        // queue) must go when it ends, not at the next ping.
        ping_interval: 600.0,
        ..GatewayConfig::default()
    };
    let app = App::start();
    let (gw, admin) = Gateway::start_with_admin(&cfg);
    let pid = gw.proc.pid();
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 2);
    rx.wait_connected(2);
    let fds_idle = sys::fd_count(pid);
    let rss_idle = sys::rss_kib(pid);

    // Warm-up: the same load without faults, then every client gone. Its
    // memory is the baseline (pools and allocator caches are filled).
    let warm_start = Instant::now();
    let warm = Load::start(gw.addr, CLIENTS, "warm");
    warm.wait_each_ok(CLIENTS, 30, warm_start, "warm-up: 30 successes per client");
    let warm = warm.finish();
    assert!(
        warm.iter().all(|r| r.outcome == Ok(200)),
        "warm-up without faults: expected only 200s, got {:?}",
        tally(&warm)
    );
    wait_until(
        "the gateway's descriptors back to idle after the warm-up",
        WAIT,
        || sys::fd_count(pid) <= fds_idle,
    );
    let rss_base = sys::rss_kib(pid);

    // Load, with HELD slow requests parked in the app (X-Test-Hold).
    let t0 = Instant::now();
    let load = Load::start(gw.addr, CLIENTS, "load");
    load.wait_each_ok(CLIENTS, 20, t0, "20 successes per client before the kill");
    let held: Vec<_> = (0..HELD)
        .map(|i| {
            let addr = gw.addr;
            thread::spawn(move || {
                let name = format!("held-{i}");
                let r = client::request(
                    addr,
                    "GET",
                    &format!("/alice/held/{i}"),
                    &[("X-Test-Hold", &name)],
                    &[],
                );
                r.status
            })
        })
        .collect();
    for i in 0..HELD {
        app.wait_arrived(&format!("held-{i}"));
    }

    // The fault.
    let kill_at = Instant::now();
    rx.kill(); // SIGKILL, then reaped
    let held: Vec<u16> = held.into_iter().map(|h| h.join().unwrap()).collect();
    wait_until("/health to report 0 tunnels after the kill", WAIT, || {
        health_tunnels(admin) == 0
    });
    let none_at = Instant::now();
    wait_until(
        "32 requests answered 503 while no tunnel is connected",
        WAIT,
        || {
            let recs = load.recs.lock().unwrap();
            recs.iter()
                .filter(|r| r.start > none_at && r.outcome == Ok(503))
                .count()
                >= CLIENTS
        },
    );

    // A new receiver; clients carry on on their connections.
    let rx2_start = Instant::now();
    let mut rx2 = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 2);
    rx2.wait_connected(2);
    let reconnected_at = Instant::now();
    load.wait_each_ok(
        CLIENTS,
        20,
        reconnected_at,
        "20 successes per client after the new receiver connected",
    );
    let recs = load.finish();

    let counts = tally(&recs);
    println!(
        "receiver SIGKILL under load: {} requests by {CLIENTS} clients: {:?}; held requests in flight at the kill: {:?}",
        recs.len(),
        counts,
        held
    );
    let n502 = recs.iter().filter(|r| r.outcome == Ok(502)).count();
    let n502_late = recs
        .iter()
        .filter(|r| r.outcome == Ok(502) && r.start > kill_at)
        .count();
    println!(
        "  phases from the first request: kill at {:?}, no tunnel seen at {:?}, new receiver started at {:?}, connected at {:?}, end {:?}; 502s of requests sent after the kill (before the gateway saw the tunnels close): {n502_late}",
        kill_at - t0,
        none_at - t0,
        rx2_start - t0,
        reconnected_at - t0,
        recs.iter().map(|r| r.end).max().unwrap() - t0
    );
    let n503 = recs.iter().filter(|r| r.outcome == Ok(503)).count();
    println!(
        "  failed: 502 (in flight on the dying tunnels) {n502}, 503 (no tunnel) {n503}; ok {}",
        counts.get("200").copied().unwrap_or(0)
    );
    assert!(
        held.iter().all(|s| *s == 502),
        "requests in flight at the app when the receiver died: expected 502 each, got {held:?}"
    );
    // Clients retry cleanly: no connection was lost, only answers.
    let io: Vec<_> = recs.iter().filter(|r| r.outcome.is_err()).collect();
    assert!(
        io.is_empty(),
        "expected every request answered (a connection the gateway closes says `connection: close` first), got {} I/O errors, the first: {:?}",
        io.len(),
        &io[..io.len().min(5)]
    );
    for r in &recs {
        let s = r.outcome.clone().unwrap();
        assert!(
            matches!(s, 200 | 502 | 503),
            "expected only 200, 502 (in flight) or 503 (no tunnel), got {r:?}"
        );
        if r.end < kill_at {
            assert_eq!(
                s, 200,
                "a request answered before the kill: expected 200, got {r:?}"
            );
        }
        if s == 502 {
            assert!(
                r.start < none_at,
                "502 only for requests the gateway had sent to the dead tunnels (started before it had none): {r:?}"
            );
        }
        if s == 503 {
            assert!(
                r.retry_after,
                "503 (no tunnel): expected Retry-After: {r:?}"
            );
        }
        if r.start > none_at && r.end < rx2_start {
            assert_eq!(
                s, 503,
                "a request while no tunnel was connected: expected 503, got {r:?}"
            );
        }
        if r.start > reconnected_at {
            assert_eq!(
                s, 200,
                "a request after the new receiver connected: expected 200, got {r:?}"
            );
        }
    }
    assert!(n503 >= CLIENTS, "expected the 503s waited for, got {n503}");

    // Memory: once every client is gone, back to the warm-up baseline.
    wait_until(
        "the gateway's descriptors back to idle after the faults",
        WAIT,
        || sys::fd_count(pid) <= fds_idle,
    );
    let mut rss_after = 0;
    wait_until(
        &format!("the gateway's memory back to at most baseline {rss_base} KiB + {SLACK_KIB} KiB"),
        Duration::from_secs(30),
        || {
            rss_after = sys::rss_kib(pid);
            rss_after <= rss_base + SLACK_KIB
        },
    );
    println!(
        "  gateway VmRSS: idle {:.1} MiB, baseline after warm-up {:.1} MiB, after the faults {:.1} MiB (peak VmHWM {:.1} MiB; allowed: baseline + {} MiB); descriptors {} before and after",
        mib(rss_idle),
        mib(rss_base),
        mib(rss_after),
        mib(sys::hwm_kib(pid)),
        SLACK_KIB / 1024,
        fds_idle
    );
    assert!(
        rss_after <= rss_base + SLACK_KIB,
        "gateway memory after the faults: expected at most baseline {rss_base} KiB + {SLACK_KIB} KiB, got {rss_after} KiB"
    );
    // And it still serves.
    let r = client::request(gw.addr, "GET", "/alice/after", &[], &[]);
    assert_eq!(
        r.status,
        200,
        "after everything: expected 200, got {}",
        r.summary()
    );
}

// ------------------------------------------------- 2. gateway killed

/// `(tunnel, delay)` of each `reconnecting tunnel=K after=D` log line.
fn reconnect_delays(lines: &[String]) -> Vec<(u32, Duration)> {
    lines
        .iter()
        .filter(|l| l.contains(" reconnecting "))
        .filter_map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .map(str::to_string)
            };
            Some((
                field("tunnel=")?.parse().ok()?,
                parse_debug_duration(&field("after=")?)?,
            ))
        })
        .collect()
}

/// `Duration`'s `Debug` text (`1.5s`, `250.3ms`, `12µs`, `7ns`).
fn parse_debug_duration(s: &str) -> Option<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic() || c == 'µ')?);
    let v: f64 = num.parse().ok()?;
    let secs = match unit {
        "s" => v,
        "ms" => v / 1e3,
        "µs" => v / 1e6,
        "ns" => v / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

#[test]
fn gateway_killed_receiver_backs_off_and_reconnects_to_a_new_one() {
    let _turn = serial();
    const TUNNELS: u32 = 2;
    /// Reconnect attempts per tunnel watched while the gateway is down.
    const ATTEMPTS: usize = 5;
    // The receiver's backoff (src/receiver/tunnel.rs): 250 ms doubling,
    // capped at reconnect_max_delay (30 s), each wait jittered in [d/2, d).
    let base = Duration::from_millis(250);
    let cap = Duration::from_secs(30);

    let app = App::start();
    let mut gw = Gateway::start(&GatewayConfig::default());
    let addr = gw.addr;
    let mut rx = Receiver::start(addr, app.addr, ALICE_TOKEN, TUNNELS);
    rx.wait_connected(TUNNELS as usize);
    let r = client::request(addr, "GET", "/alice/before", &[], &[]);
    assert_eq!(
        r.status,
        200,
        "before the kill: expected 200, got {}",
        r.summary()
    );

    let mark = rx.proc.stderr_len();
    gw.kill(); // SIGKILL
    let down_at = Instant::now();
    wait_until(
        &format!("the receiver to log {ATTEMPTS} reconnect waits per tunnel with no gateway"),
        WAIT,
        || {
            let d = reconnect_delays(&rx.proc.stderr_lines(mark));
            (0..TUNNELS).all(|t| d.iter().filter(|(k, _)| *k == t).count() >= ATTEMPTS)
        },
    );
    let lines = rx.proc.stderr_lines(mark);
    let down_for = down_at.elapsed();
    let delays = reconnect_delays(&lines);
    let failures = lines.iter().filter(|l| l.contains(" tunnel down ")).count();
    println!(
        "gateway SIGKILL: over {down_for:?} down the receiver logged {} tunnel failures and {} reconnect waits for {TUNNELS} tunnels: {:?}",
        failures,
        delays.len(),
        delays
    );
    assert!(
        rx.proc.exited().is_none(),
        "the receiver must keep running without a gateway"
    );
    for t in 0..TUNNELS {
        let mine: Vec<Duration> = delays
            .iter()
            .filter(|(k, _)| *k == t)
            .map(|(_, d)| *d)
            .collect();
        for (k, d) in mine.iter().enumerate() {
            // Exponential backoff: the k-th wait is at least half of
            // base·2^k (capped); a spinning receiver waits ~0 every time.
            let nominal = base.saturating_mul(1 << k.min(20)).min(cap);
            assert!(
                *d >= nominal / 2 && *d <= nominal,
                "tunnel {t}: reconnect wait #{k}: expected within [{:?}, {nominal:?}] (backoff), got {d:?}; all: {mine:?}",
                nominal / 2
            );
        }
        // One attempt per wait (plus the one that found the tunnel gone):
        // attempts are paced by the waits, never retried in a loop.
        let downs = lines
            .iter()
            .filter(|l| l.contains(" tunnel down ") && l.contains(&format!("tunnel={t} ")))
            .count();
        assert!(
            downs <= mine.len() + 1,
            "tunnel {t}: expected at most one failed attempt per reconnect wait, got {downs} failures for {} waits",
            mine.len()
        );
    }

    // A new gateway on the same port: the receiver comes back by itself.
    let cfg = GatewayConfig {
        port: addr.port(),
        ..GatewayConfig::default()
    };
    let (gw2, admin2) = Gateway::start_with_admin(&cfg);
    assert_eq!(
        gw2.addr, addr,
        "the new gateway must listen on the old port"
    );
    wait_until(
        "the receiver's tunnels back on the new gateway",
        WAIT,
        || health_tunnels(admin2) == TUNNELS as u64,
    );
    wait_until(
        "requests served again through the new gateway",
        WAIT,
        || client::request(addr, "GET", "/alice/again", &[], &[]).status == 200,
    );
    let r = client::request(addr, "POST", "/alice/again/post", &[], b"hello again");
    assert_eq!(
        r.status,
        200,
        "after the reconnect: expected 200, got {}",
        r.summary()
    );
    assert_eq!(
        r.body, b"hello again",
        "after the reconnect: expected the body echoed"
    );
    println!("  reconnected {TUNNELS} tunnels to the new gateway on {addr}");
}

// ------------------------------------------------- 3. receiver stopped

#[test]
fn stopped_receiver_times_out_with_504_while_other_tunnels_are_served() {
    let _turn = serial();
    const STALLED: usize = 3;
    const BIG: usize = 16;
    const BIG_LEN: usize = 4 << 20;
    /// Uploads aimed at the stopped tunnel may cost this much gateway
    /// memory (credit windows, socket buffers), far less than the 64 MiB sent.
    const BIG_SLACK_KIB: u64 = 32 * 1024;

    let cfg = GatewayConfig {
        timeout: 2.0,
        // Pings would close the silent tunnel after 3 intervals; keep it for
        // the whole test so the stall is what the gateway lives with.
        ping_interval: 120.0,
        ..GatewayConfig::default()
    };
    let app = App::start();
    let gw = Gateway::start(&cfg);
    let pid = gw.proc.pid();
    let mut alice = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 2);
    alice.wait_connected(2);
    let mut bob = Receiver::start(gw.addr, app.addr, BOB_TOKEN, 2);
    bob.wait_connected(2);
    for p in ["/alice/warm", "/bob/warm"] {
        let r = client::request(gw.addr, "GET", p, &[], &[]);
        assert_eq!(
            r.status,
            200,
            "GET {p} before the stall: expected 200, got {}",
            r.summary()
        );
    }

    // Bob's requests run the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let bob_recs = Arc::new(Mutex::new(Vec::<(Instant, Instant, u16)>::new()));
    let bob_thread = {
        let (stop, recs, addr) = (stop.clone(), bob_recs.clone(), gw.addr);
        thread::spawn(move || {
            let mut c = Conn::connect(addr);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let start = Instant::now();
                let r = c.request("GET", &format!("/bob/healthy/{n}"), &[], &[]);
                recs.lock().unwrap().push((start, Instant::now(), r.status));
            }
        })
    };

    let rss_before = sys::rss_kib(pid);
    sys::stop(alice.proc.pid());

    // Alice's requests: 504 after `timeout`, on a connection that stays usable.
    let mut windows = Vec::new();
    let mut c = Conn::connect(gw.addr);
    for k in 0..STALLED {
        let sent = Instant::now();
        let r = c.request("GET", &format!("/alice/stalled/{k}"), &[], &[]);
        windows.push((sent, Instant::now()));
        assert_eq!(
            r.status,
            504,
            "alice request {k} to the stopped receiver: expected 504, got {}",
            r.summary()
        );
    }

    // Large uploads to the stopped tunnel: refused in time, not buffered.
    let big: Vec<_> = (0..BIG)
        .map(|i| {
            let addr = gw.addr;
            thread::spawn(move || {
                let body = vec![b'x'; BIG_LEN];
                let req = build_request("POST", format!("/alice/big/{i}").as_bytes(), &[], &body);
                client::send_raw_method(addr, &req, "POST").status
            })
        })
        .collect();
    let big: Vec<u16> = big.into_iter().map(|h| h.join().unwrap()).collect();
    let hwm = sys::hwm_kib(pid);
    let rss_big = sys::rss_kib(pid);

    stop.store(true, Ordering::Relaxed);
    bob_thread.join().expect("bob's client panicked");
    let bob_recs = bob_recs.lock().unwrap().clone();
    sys::signal(alice.proc.pid(), libc::SIGCONT);

    let per_window: Vec<usize> = windows
        .iter()
        .map(|(a, b)| {
            bob_recs
                .iter()
                .filter(|(s, e, st)| s >= a && e <= b && *st == 200)
                .count()
        })
        .collect();
    println!(
        "receiver SIGSTOP: alice {STALLED} requests -> 504; bob {} requests, all 200: {}; bob successes inside each alice wait: {per_window:?}",
        bob_recs.len(),
        bob_recs.iter().all(|r| r.2 == 200)
    );
    println!(
        "  {BIG} uploads of {} MiB to the stopped tunnel: statuses {big:?}; gateway VmRSS {:.1} MiB before, {:.1} MiB after, peak VmHWM {:.1} MiB (allowed: before + {} MiB)",
        BIG_LEN >> 20,
        mib(rss_before),
        mib(rss_big),
        mib(hwm),
        BIG_SLACK_KIB / 1024
    );
    let bad: Vec<_> = bob_recs.iter().filter(|r| r.2 != 200).collect();
    assert!(
        bad.is_empty(),
        "bob's tunnel must be unaffected, got failures {bad:?}"
    );
    for (k, n) in per_window.iter().enumerate() {
        assert!(*n >= 1, "expected bob served while alice's request {k} waited on the stopped receiver, got {per_window:?}");
    }
    assert!(
        big.iter().all(|s| *s == 504),
        "uploads to the stopped receiver: expected 504 each (no credit within timeout), got {big:?}"
    );
    assert!(
        hwm <= rss_before + BIG_SLACK_KIB,
        "gateway peak memory with {} MiB sent to a stopped tunnel: expected at most {} KiB + {BIG_SLACK_KIB} KiB, got {hwm} KiB",
        (BIG * BIG_LEN) >> 20,
        rss_before
    );

    // Continued, alice serves again.
    wait_until("alice served again after SIGCONT", WAIT, || {
        client::request(gw.addr, "GET", "/alice/resumed", &[], &[]).status == 200
    });
    let r = client::request(gw.addr, "GET", "/bob/still", &[], &[]);
    assert_eq!(
        r.status,
        200,
        "bob at the end: expected 200, got {}",
        r.summary()
    );
}

#[test]
fn stopped_receiver_cut_by_ping_timeout_leaves_no_socket_behind() {
    let _turn = serial();
    const UPLOADS: usize = 48;
    const LEN: usize = 256 << 10;
    let cfg = GatewayConfig {
        timeout: 2.0,
        // A tunnel silent for 3 intervals is closed.
        ping_interval: 1.0,
        ..GatewayConfig::default()
    };
    let app = App::start();
    let (gw, admin) = Gateway::start_with_admin(&cfg);
    let pid = gw.proc.pid();
    let fds_idle = sys::fd_count(pid);
    let mut alice = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 2);
    alice.wait_connected(2);
    let r = client::request(gw.addr, "GET", "/alice/warm", &[], &[]);
    assert_eq!(
        r.status,
        200,
        "before the stall: expected 200, got {}",
        r.summary()
    );
    let mark = gw.proc.stderr_len();
    sys::stop(alice.proc.pid());

    // 12 MiB towards the stopped receiver: more than the sockets buffer,
    // so the gateway's tunnel writer is left waiting on a full socket.
    let ups: Vec<_> = (0..UPLOADS)
        .map(|i| {
            let addr = gw.addr;
            thread::spawn(move || {
                let body = vec![b'y'; LEN];
                let req = build_request("POST", format!("/alice/fill/{i}").as_bytes(), &[], &body);
                client::send_raw_method(addr, &req, "POST").status
            })
        })
        .collect();
    let statuses: Vec<u16> = ups.into_iter().map(|h| h.join().unwrap()).collect();
    wait_until("the gateway to close both silent tunnels", WAIT, || {
        gw.proc
            .stderr_lines(mark)
            .iter()
            .filter(|l| l.contains("tunnel disconnected") && l.contains("no traffic"))
            .count()
            == 2
    });
    // Their sockets go too, though the receiver still reads nothing.
    let took = wait_until(
        "the gateway's descriptors back to idle with the receiver still stopped",
        WAIT,
        || sys::fd_count(pid) <= fds_idle,
    );
    println!(
        "receiver SIGSTOP, ping timeout: {UPLOADS} uploads of {} KiB -> {:?}; gateway descriptors {fds_idle} without tunnels, back {took:?} after the cut",
        LEN >> 10,
        tally_statuses(&statuses)
    );
    assert!(
        statuses.iter().all(|s| matches!(s, 502 | 504)),
        "uploads to the stopped receiver: expected 504 (timeout) or 502 (its tunnel closed first), got {statuses:?}"
    );
    assert_eq!(health_tunnels(admin), 0);
    sys::signal(alice.proc.pid(), libc::SIGCONT);
    wait_until("alice served again after SIGCONT", WAIT, || {
        client::request(gw.addr, "GET", "/alice/resumed", &[], &[]).status == 200
    });
}

fn tally_statuses(v: &[u16]) -> BTreeMap<u16, usize> {
    let mut m = BTreeMap::new();
    for s in v {
        *m.entry(*s).or_insert(0) += 1;
    }
    m
}

// ------------------------------------------------- 4. 10,000 connections

const CONNS: usize = 10_000;
const AFTER_PROXIED: usize = 1_000;
const AFTER_HEALTH: usize = 1_000;
const MID_HEAD: usize = 200;
const MID_BODY: usize = 200;

#[test]
fn ten_thousand_client_connections_leave_no_descriptor_behind() {
    let _turn = serial();
    const ROUNDS: usize = 2;
    /// Allocator caches are not leaks (see test 1). What the allocator
    /// hands back to the kernel after the closes depends on timing: one
    /// loaded run saw round 1 end at 44 MiB (purged) and round 2 at 83
    /// (not yet), both having held 83-87 MiB. So each round is held
    /// against round 1's peak: what round 1 leaked would still be there
    /// when round 2 holds its own 10,000 connections. A leak of what each
    /// connection held (~5 KiB: round 1 held ~54 MiB) would add ~50 MiB,
    /// and one of even 2 KiB each still shows past 16 MiB.
    const SLACK_KIB: u64 = 16 * 1024;

    let limit = sys::raise_nofile_limit();
    // This process holds CONNS sockets; so does the gateway (it inherits
    // the limit), plus its listeners, tunnels and runtime descriptors.
    if limit < (CONNS + 1024) as u64 {
        eprintln!(
            "SKIPPED ten_thousand_client_connections_leave_no_descriptor_behind: RLIMIT_NOFILE hard limit is {limit}, need at least {}",
            CONNS + 1024
        );
        return;
    }
    let cfg = GatewayConfig {
        max_connections: 12_000,
        keepalive_timeout: 600.0,
        // Mid-head and mid-body connections must stay for the whole test.
        extra_gateway_toml: "header_timeout = 600.0\nrequest_body_timeout = 600.0\n".into(),
        ..GatewayConfig::default()
    };
    let app = App::start();
    let (gw, admin) = Gateway::start_with_admin(&cfg);
    let pid = gw.proc.pid();
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 2);
    rx.wait_connected(2);
    let fds_before = sys::fd_count(pid);
    let r = client::request(gw.addr, "GET", "/alice/first", &[], &[]);
    assert_eq!(
        r.status,
        200,
        "first request: expected 200, got {}",
        r.summary()
    );
    // Its connection is gone from the gateway too before anything is held.
    wait_until("the first request's connection closed", WAIT, || {
        sys::fd_count(pid) <= fds_before
    });
    let rss_before = sys::rss_kib(pid);
    // Twice: descriptors must come back each time, and the second round
    // must not need more memory than the first kept (a leak would grow).
    let mut rss_after = Vec::new();
    let mut peaks = Vec::new();
    for round in 1..=ROUNDS {
        let (fds_held, rss_held, idle) = hold_connections(gw.addr, pid, fds_before);
        peaks.push(rss_held);
        let took = wait_until(
            "the gateway's descriptors back to their count before",
            WAIT,
            || sys::fd_count(pid) <= fds_before,
        );
        let fds_after = sys::fd_count(pid);
        rss_after.push(sys::rss_kib(pid));
        println!(
            "round {round}: {CONNS} connections ({AFTER_PROXIED} keep-alive after a proxied request, {AFTER_HEALTH} after /health, {MID_HEAD} mid-head, {MID_BODY} mid-body, {idle} idle): gateway descriptors {fds_before} before, {fds_held} held, {fds_after} after (back within {took:?}); VmRSS {:.1} MiB before, {:.1} MiB held, {:.1} MiB after",
            mib(rss_before),
            mib(rss_held),
            mib(rss_after[round - 1])
        );
        assert_eq!(fds_after, fds_before);
    }
    for (what, kib) in [
        ("holding", peaks[ROUNDS - 1]),
        ("after", rss_after[ROUNDS - 1]),
    ] {
        assert!(
            kib <= peaks[0] + SLACK_KIB,
            "gateway memory {what} round {ROUNDS}: expected at most round 1's peak {} KiB + {SLACK_KIB} KiB (what the allocator keeps is reused), got {kib} KiB",
            peaks[0]
        );
    }
    let r = client::request(gw.addr, "GET", "/alice/after", &[], &[]);
    assert_eq!(
        r.status,
        200,
        "after the close: expected 200, got {}",
        r.summary()
    );
    // The receiver kept its tunnels through all of it.
    assert_eq!(
        health_tunnels(admin),
        2,
        "expected both tunnels still connected"
    );
}

/// Opens CONNS connections to `gw` in the mix below, checks the gateway
/// holds them all and still serves a normal request, then closes them.
/// Returns the gateway's descriptors and VmRSS while held, and the idle count.
fn hold_connections(gw: SocketAddr, pid: u32, fds_before: usize) -> (usize, u64, usize) {
    let mut held: Vec<TcpStream> = Vec::with_capacity(CONNS);
    let mut kept: Vec<Conn> = Vec::with_capacity(AFTER_PROXIED + AFTER_HEALTH);
    for i in 0..AFTER_PROXIED + AFTER_HEALTH {
        let mut c = Conn::connect(gw);
        let path = if i < AFTER_PROXIED {
            format!("/alice/ka/{i}")
        } else {
            "/health".to_string()
        };
        let r = c.request("GET", &path, &[], &[]);
        assert_eq!(
            r.status,
            200,
            "keep-alive connection {i}: GET {path}: expected 200, got {}",
            r.summary()
        );
        kept.push(c);
    }
    for i in 0..MID_HEAD {
        let mut s = TcpStream::connect(gw).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.write_all(format!("GET /alice/mid-head/{i} HTTP/1.1\r\nHost: x\r\nX-Half: ").as_bytes())
            .unwrap();
        held.push(s);
    }
    for i in 0..MID_BODY {
        let mut s = TcpStream::connect(gw).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.write_all(
            format!("POST /alice/mid-body/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nfirst part")
                .as_bytes(),
        )
        .unwrap();
        held.push(s);
    }
    let idle = CONNS - kept.len() - held.len();
    for i in 0..idle {
        held.push(TcpStream::connect(gw).unwrap_or_else(|e| panic!("idle connection {i}: {e}")));
    }
    assert_eq!(held.len() + kept.len(), CONNS);
    wait_until(
        &format!("the gateway to hold all {CONNS} connections"),
        WAIT,
        || sys::fd_count(pid) >= fds_before + CONNS,
    );
    let fds_held = sys::fd_count(pid);
    let rss_held = sys::rss_kib(pid);

    // A normal request still gets through while they are held.
    let r = client::request(gw, "POST", "/alice/while-held", &[], b"still here");
    assert_eq!(
        r.status,
        200,
        "while {CONNS} connections are held: expected 200, got {}",
        r.summary()
    );
    assert_eq!(r.body, b"still here");
    let r = client::request(gw, "GET", "/health", &[], &[]);
    assert_eq!(
        r.status,
        200,
        "GET /health while held: expected 200, got {}",
        r.summary()
    );
    drop(held);
    drop(kept);
    (fds_held, rss_held, idle)
}
