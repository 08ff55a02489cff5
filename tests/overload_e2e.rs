//! Overload and abuse, end to end (issue 12): token-bucket rate limits
//! (429 with `Retry-After` and the RateLimit fields), per-identity places
//! in flight with a bounded queue (503 at once past it), fair turns across
//! identities, connections per client address.
//!
//! Every test counts and orders, never times: a rate limit uses a refill
//! rate so low (0.001/s) that no token comes back during the test (or,
//! where refills are the point, two refills are ordered against each
//! other), a stuck app holds its requests until released, and queues are
//! observed through `/metrics` with `wait_until`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::client::{build_request, request, READ_TIMEOUT};
use common::{wait_until, App, Conn, Gateway, GatewayConfig, Receiver, ALICE_TOKEN, BOB_TOKEN};

const LOOPBACK: &str = "127.0.0.1";
const CLIENT: &str = "127.0.0.5";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cfg(workers: u32, extra: &str) -> GatewayConfig {
    GatewayConfig {
        workers,
        extra_gateway_toml: extra.into(),
        ..GatewayConfig::default()
    }
}

/// `[[gateway.rate_limits]]` with one entry that never refills during a
/// test (inline, so the harness's `[gateway]` keys can follow it); `more`:
/// `, key = value` pairs.
fn rule(scope: &str, burst: u32, more: &str) -> String {
    format!("rate_limits = [{{ scope = \"{scope}\", rate = 0.001, burst = {burst}{more} }}]\n")
}

/// A gateway (admin on), an app, and receivers for alice and, if asked, bob.
struct Rig {
    app: App,
    gw: Gateway,
    admin: SocketAddr,
    rx: Vec<Receiver>,
}

fn rig(c: &GatewayConfig, bob: bool) -> Rig {
    let app = App::start();
    let (gw, admin) = Gateway::start_with_admin(c);
    let tunnels = c.workers;
    let mut rx = vec![Receiver::start(gw.addr, app.addr, ALICE_TOKEN, tunnels)];
    if bob {
        rx.push(Receiver::start(gw.addr, app.addr, BOB_TOKEN, tunnels));
    }
    for r in &mut rx {
        r.wait_connected(tunnels as usize);
    }
    Rig { app, gw, admin, rx }
}

impl Rig {
    /// A request to `/alice/{name}` the app holds (`X-Test-Hold`), once
    /// the app has it: its connection.
    fn hold(&self, name: &str) -> Conn {
        let mut c = Conn::connect(self.gw.addr);
        c.send(
            "GET",
            &format!("/alice/{name}"),
            &[("X-Test-Hold", name)],
            b"",
        )
        .unwrap();
        self.app.wait_arrived(name);
        c
    }
}

/// The value of the `/metrics` sample whose name and labels are `sample`.
fn metric(admin: SocketAddr, sample: &str) -> u64 {
    let r = request(admin, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    let text = r.body_text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn after_the_burst_the_next_request_gets_429_with_the_ratelimit_fields() {
    let r = rig(&cfg(1, &rule("client_ip", 3, ", name = \"per-ip\"")), false);
    let mut c = Conn::connect_from(r.gw.addr, ip(LOOPBACK));
    for i in 0..3 {
        let resp = c.request("GET", &format!("/alice/{i}"), &[], b"");
        assert_eq!(
            resp.status,
            200,
            "request {i} within the burst: {}",
            resp.summary()
        );
    }
    let resp = c.request("GET", "/alice/3", &[], b"");
    assert_eq!(resp.status, 429, "{}", resp.summary());
    // 1 token missing at 0.001/s: 1000 s.
    assert_eq!(resp.header("retry-after"), Some("1000"));
    assert_eq!(
        resp.header("ratelimit-policy"),
        Some("\"per-ip\";q=3;w=3000")
    );
    assert_eq!(resp.header("ratelimit"), Some("\"per-ip\";r=0;t=1000"));
    assert!(
        resp.body_text().contains("rate_limited"),
        "{}",
        resp.body_text()
    );
    // The connection stays usable (and limited).
    assert_eq!(c.request("GET", "/alice/4", &[], b"").status, 429);
    assert_eq!(
        r.app.requests().len(),
        3,
        "refused requests never reach the app"
    );
    // Another source address has its own bucket.
    let mut other = Conn::connect_from(r.gw.addr, ip("127.0.0.2"));
    assert_eq!(other.request("GET", "/alice/x", &[], b"").status, 200);
    let mut gw = r.gw;
    gw.proc
        .wait_log(&["request refused", "rate_limited", "per-ip"]);
    assert_eq!(
        metric(r.admin, "anp_rate_limited_total{scope=\"client_ip\"}"),
        2
    );
}

#[test]
fn a_route_scope_limit_applies_to_its_prefix_and_not_to_another() {
    let r = rig(&cfg(1, &rule("route", 2, ", match = \"/alice\"")), false);
    let mut c = Conn::connect(r.gw.addr);
    assert_eq!(c.request("GET", "/alice/a", &[], b"").status, 200);
    assert_eq!(c.request("GET", "/alice/b", &[], b"").status, 200);
    assert_eq!(c.request("GET", "/alice/c", &[], b"").status, 429);
    // From another address too: the bucket is the route's.
    let mut other = Conn::connect_from(r.gw.addr, ip("127.0.0.2"));
    assert_eq!(other.request("GET", "/alice/d", &[], b"").status, 429);
    // alice's other prefix is not under `/alice`.
    for i in 0..5 {
        let resp = c.request("GET", &format!("/shared/alice/{i}"), &[], b"");
        assert_eq!(resp.status, 200, "{}", resp.summary());
    }
    assert_eq!(
        metric(r.admin, "anp_rate_limited_total{scope=\"route\"}"),
        2
    );
}

#[test]
fn a_sighup_that_raises_the_limit_takes_effect() {
    let c1 = cfg(1, &rule("identity", 1, ", match = \"alice\""));
    let mut r = rig(&c1, false);
    let mut c = Conn::connect(r.gw.addr);
    assert_eq!(c.request("GET", "/alice/1", &[], b"").status, 200);
    assert_eq!(c.request("GET", "/alice/2", &[], b"").status, 429);
    // Same address, same port: only the limit changes.
    let text = std::fs::read_to_string(&r.gw.config_path).unwrap();
    let raised = text.replace("burst = 1,", "burst = 4,");
    assert_ne!(raised, text);
    std::fs::write(&r.gw.config_path, raised).unwrap();
    r.gw.signal(libc::SIGHUP);
    r.gw.proc.wait_stdout("anp-proxy reloaded");
    for i in 0..4 {
        let resp = c.request("GET", &format!("/alice/r{i}"), &[], b"");
        assert_eq!(
            resp.status,
            200,
            "after the reload, {i}: {}",
            resp.summary()
        );
    }
    assert_eq!(c.request("GET", "/alice/r4", &[], b"").status, 429);
}

/// Each core has full-size buckets (docs/OPERATIONS.md): with 2 workers
/// and burst 3, one address spreading connections over both cores gets
/// at least 3 and at most 2 × 3 requests through, never more.
#[test]
fn across_cores_one_address_gets_between_burst_and_workers_times_burst() {
    let r = rig(&cfg(2, &rule("client_ip", 3, "")), false);
    let (mut ok, mut limited) = (0, 0);
    for i in 0..40 {
        let resp = request(r.gw.addr, "GET", &format!("/alice/{i}"), &[], b"");
        match resp.status {
            200 => ok += 1,
            429 => limited += 1,
            s => panic!("unexpected {s}: {}", resp.summary()),
        }
    }
    assert!((3..=6).contains(&ok), "{ok} passed, {limited} limited");
    assert_eq!(ok + limited, 40);
}

/// A flood of distinct source addresses: the table keeps at most
/// `rate_limit_table_size` buckets per core, dropping the least recently
/// used, and every new address still gets its burst.
#[test]
fn the_bucket_table_stays_bounded_under_many_distinct_addresses() {
    let extra = format!("rate_limit_table_size = 16\n{}", rule("client_ip", 1, ""));
    let r = rig(&cfg(1, &extra), false);
    let mut n = 0;
    for a in 1..=3u8 {
        for b in 1..=80u8 {
            let src = IpAddr::from([127, 0, a, b]);
            let resp = Conn::connect_from(r.gw.addr, src).request("GET", "/alice/x", &[], b"");
            assert_eq!(resp.status, 200, "from {src}: {}", resp.summary());
            n += 1;
        }
    }
    let buckets = metric(r.admin, "anp_rate_limit_buckets");
    assert!(buckets <= 16, "{buckets} buckets");
    let evicted = metric(r.admin, "anp_rate_limit_evictions_total{kind=\"active\"}");
    assert_eq!(evicted + buckets, n, "every bucket is held or was evicted");
}

/// alice's app never answers: 2 in flight, 2 queued, and every further
/// request for alice is answered 503 + Retry-After at once (not 504 after
/// `timeout`, which is 60 s here) while bob's paced requests all succeed.
#[test]
fn a_stuck_identity_is_shed_at_once_while_another_is_served() {
    // shed_pause = 0: the flood's connection is read on at once (the pause
    // has a test of its own below).
    let extra = "max_inflight_per_identity = 2\nmax_queue_per_identity = 2\nqueue_timeout = 60\n\
                 shed_pause = 0\n";
    let mut c = cfg(1, extra);
    c.timeout = 60.0;
    let r = rig(&c, true);
    let stuck = [("X-Test-Hold", "stuck")];
    // Two in flight, held by the app.
    let mut held = Vec::new();
    for i in 0..2 {
        let mut conn = Conn::connect(r.gw.addr);
        conn.send("GET", &format!("/alice/held{i}"), &stuck, b"")
            .unwrap();
        held.push(conn);
    }
    wait_until("alice has 2 in flight", Duration::from_secs(10), || {
        metric(r.admin, "anp_identity_in_flight{identity=\"alice\"}") == 2
    });
    // Two queued.
    for i in 0..2 {
        let mut conn = Conn::connect(r.gw.addr);
        conn.send("GET", &format!("/alice/queued{i}"), &stuck, b"")
            .unwrap();
        held.push(conn);
    }
    wait_until("alice has 2 queued", Duration::from_secs(10), || {
        metric(r.admin, "anp_identity_queue_depth{identity=\"alice\"}") == 2
    });
    // A flood at many times that capacity: every one shed at once, with
    // bob's paced requests in between.
    let mut flood = Conn::connect(r.gw.addr);
    flood.set_read_timeout(READ_TIMEOUT.min(Duration::from_secs(30)));
    let mut bob = Conn::connect(r.gw.addr);
    for i in 0..50 {
        let resp = flood.request("GET", &format!("/alice/flood{i}"), &stuck, b"");
        assert_eq!(resp.status, 503, "{}", resp.summary());
        assert_eq!(resp.header("retry-after"), Some("1"));
        assert!(
            resp.body_text().contains("queue_full"),
            "{}",
            resp.body_text()
        );
        if i % 5 == 0 {
            let b = bob.request("GET", &format!("/bob/{i}"), &[], b"");
            assert_eq!(b.status, 200, "bob during alice's flood: {}", b.summary());
        }
    }
    assert_eq!(metric(r.admin, "anp_shed_total{reason=\"queue_full\"}"), 50);
    assert_eq!(
        metric(r.admin, "anp_identity_in_flight{identity=\"alice\"}"),
        2
    );
    let mut gw = r.gw;
    gw.proc.wait_log(&["request refused", "queue_full"]);
}

/// After a 503 of admission the connection is not read for `shed_pause`
/// (60 s here): its next request, for bob whose requests are served at
/// once, stays unanswered while a request sent after it on another
/// connection is served; the first refusal itself came at once.
#[test]
fn a_shed_connection_is_not_read_again_for_shed_pause() {
    let extra = "max_inflight_per_identity = 1\nmax_queue_per_identity = 0\nshed_pause = 60\n";
    let mut c = cfg(1, extra);
    c.timeout = 60.0;
    let r = rig(&c, true);
    let _held = r.hold("held");
    let mut shed = Conn::connect(r.gw.addr);
    let resp = shed.request("GET", "/alice/shed", &[], b"");
    assert_eq!(resp.status, 503, "{}", resp.summary());
    assert_eq!(resp.header("retry-after"), Some("1"));
    // The next request on that connection waits in its socket...
    shed.send("GET", "/bob/after-shed", &[], b"").unwrap();
    // ...while one sent after it on another connection is served.
    let mut other = Conn::connect(r.gw.addr);
    for i in 0..3 {
        let b = other.request("GET", &format!("/bob/other{i}"), &[], b"");
        assert_eq!(b.status, 200, "{}", b.summary());
    }
    shed.set_read_timeout(Duration::from_millis(300));
    assert!(
        shed.read().is_err(),
        "the shed connection's next request was read within shed_pause"
    );
    assert_eq!(metric(r.admin, "anp_shed_total{reason=\"queue_full\"}"), 1);
}

/// Three requests to `{prefix}/0..2` in one write on a new connection:
/// the first served, the second refused 429 with `Retry-After:
/// {retry_after}`; the connection, the third still to be read.
fn served_then_refused(gw: SocketAddr, prefix: &str, retry_after: &str) -> Conn {
    let mut c = Conn::connect(gw);
    let mut three = Vec::new();
    for i in 0..3 {
        three.extend(build_request(
            "GET",
            format!("{prefix}/{i}").as_bytes(),
            &[],
            b"",
        ));
    }
    c.write_raw(&three, &["GET"; 3]).unwrap();
    let first = c.read().unwrap();
    assert_eq!(first.status, 200, "{}", first.summary());
    let refused = c.read().unwrap();
    assert_eq!(refused.status, 429, "{}", refused.summary());
    assert_eq!(
        refused.header("retry-after"),
        Some(retry_after),
        "{}",
        refused.summary()
    );
    c
}

/// After a 429 the connection is not read again until its bucket has a
/// token (2 s here, its `Retry-After`; `shed_pause`, 30 s, only caps it):
/// a request pipelined right behind the refused one is read once its
/// bucket has refilled, so it is served, and the gateway refused only
/// once. Read at once (the pause off), it would have been refused too.
#[test]
fn a_rate_limited_connection_is_not_read_again_until_its_bucket_has_a_token() {
    // One token every 2 s, burst 1.
    let extra =
        "rate_limits = [{ scope = \"client_ip\", rate = 0.5, burst = 1 }]\nshed_pause = 30\n";
    let r = rig(&cfg(1, extra), false);
    // The second is looked at right after the first is answered, well
    // within the 2 s a token takes.
    let mut c = served_then_refused(r.gw.addr, "/alice", "2");
    let limited = || metric(r.admin, "anp_rate_limited_total{scope=\"client_ip\"}");
    // The third waits in the socket: not read, so not refused...
    assert_eq!(limited(), 1);
    // ...and read after the pause, when its bucket grants it.
    let third = c.read().unwrap();
    assert_eq!(
        third.status,
        200,
        "the request behind a 429 was read before its bucket had a token: {}",
        third.summary()
    );
    assert_eq!(limited(), 1, "only the second request was refused");
    assert_eq!(r.app.requests().len(), 2);
}

/// A 429's pause ends when its bucket has a token, not after the whole
/// `Retry-After` (whole seconds, rounded up). Two routes refill at
/// different rates and both answer `Retry-After: 1`: `/bob/limited` has a
/// token again 0.8 s after its 429, `/alice/limited` 0.2 s after. Bob's
/// connection is refused first; alice's a few round trips later. The
/// request pipelined behind each 429 is then answered alice's first. Had
/// each paused for its `Retry-After`, both would wait the same second
/// and bob's, refused first, would be answered first.
#[test]
fn a_rate_limited_connection_is_read_again_when_its_token_comes_not_after_retry_after() {
    let extra = "rate_limits = [\
        { name = \"alice\", scope = \"route\", match = \"/alice/limited\", rate = 5, burst = 1 },\
        { name = \"bob\", scope = \"route\", match = \"/bob/limited\", rate = 1.25, burst = 1 }]\n\
        shed_pause = 30\n";
    let r = rig(&cfg(1, extra), true);
    let bob = served_then_refused(r.gw.addr, "/bob/limited", "1");
    // A few served round trips between the two refusals: with pauses of
    // the whole `Retry-After`, bob's would surely end first.
    let mut free = Conn::connect(r.gw.addr);
    for i in 0..5 {
        assert_eq!(
            free.request("GET", &format!("/alice/free{i}"), &[], b"")
                .status,
            200
        );
    }
    let alice = served_then_refused(r.gw.addr, "/alice/limited", "1");
    let (tx, rx) = std::sync::mpsc::channel();
    let readers: Vec<_> = [("bob", bob), ("alice", alice)]
        .into_iter()
        .map(|(name, mut c)| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let third = c.read().unwrap();
                assert_eq!(third.status, 200, "{name}: {}", third.summary());
                tx.send(name).unwrap();
            })
        })
        .collect();
    let order: Vec<&str> = (0..2).map(|_| rx.recv().unwrap()).collect();
    for t in readers {
        t.join().unwrap();
    }
    assert_eq!(
        order,
        ["alice", "bob"],
        "the request behind alice's 429 (token in 0.2 s) was answered after bob's (0.8 s)"
    );
    assert_eq!(
        metric(r.admin, "anp_rate_limited_total{scope=\"route\"}"),
        2
    );
}

/// A drain ends a pause at once. With `shed_pause = 30` (a 429 whose
/// `Retry-After` is 1,000 s is paused that long) and `shutdown_grace =
/// 60`, SIGTERM while a connection is paused does not wait the pause out:
/// the request waiting in its socket is read and answered under the
/// drain's rules (served, `Connection: close`), and the gateway exits.
#[test]
fn a_drain_ends_a_pause_at_once() {
    let extra =
        "rate_limits = [{ scope = \"route\", match = \"/alice\", rate = 0.001, burst = 1 }]\n\
                 shed_pause = 30\nshutdown_grace = 60\n";
    let r = rig(&cfg(1, extra), true);
    let mut c = Conn::connect(r.gw.addr);
    assert_eq!(c.request("GET", "/alice/0", &[], b"").status, 200);
    let refused = c.request("GET", "/alice/1", &[], b"");
    assert_eq!(refused.status, 429, "{}", refused.summary());
    // Paused for 30 s: bob's request (not limited) waits in the socket.
    c.send("GET", "/bob/after-pause", &[], b"").unwrap();
    let mut gw = r.gw;
    gw.signal(libc::SIGTERM);
    // A correctness bound, not a speed one: far below the 30 s pause.
    let within = Duration::from_secs(15);
    c.set_read_timeout(within);
    let after = c
        .read()
        .expect("the paused connection's request is answered once the drain begins");
    assert_eq!(after.status, 200, "{}", after.summary());
    assert_eq!(
        after.header("connection").map(str::to_ascii_lowercase),
        Some("close".into()),
        "a draining gateway says it closes"
    );
    let status = gw.proc.wait_exit(within);
    assert!(status.success(), "drain exits 0, got {status}");
}

/// With one place per core, waiting identities take turns: alice queued
/// four requests before bob queued two, yet bob's are served second and
/// fourth, not after all of alice's.
#[test]
fn waiting_identities_are_admitted_in_turn_not_in_arrival_order() {
    let extra = "max_inflight_per_core = 1\nmax_inflight_per_identity = 100\nqueue_timeout = 60\n";
    let r = rig(&cfg(1, extra), true);
    let send = |path: &str, hold: &str| {
        let mut conn = Conn::connect(r.gw.addr);
        conn.send("GET", path, &[("X-Test-Hold", hold)], b"")
            .unwrap();
        conn
    };
    let mut conns = vec![send("/alice/first", "first")];
    r.app.wait_arrived("first");
    let queued = |who: &str| {
        metric(
            r.admin,
            &format!("anp_identity_queue_depth{{identity=\"{who}\"}}"),
        )
    };
    for i in 1..=4 {
        conns.push(send(&format!("/alice/{i}"), &format!("a{i}")));
        wait_until("alice's request queued", Duration::from_secs(10), || {
            queued("alice") == i
        });
    }
    for i in 1..=2 {
        conns.push(send(&format!("/bob/{i}"), &format!("b{i}")));
        wait_until("bob's request queued", Duration::from_secs(10), || {
            queued("bob") == i
        });
    }
    // One place: each release lets exactly the next one in.
    let mut order = Vec::new();
    let mut last = "first".to_string();
    let names = ["a1", "a2", "a3", "a4", "b1", "b2"];
    for _ in 0..names.len() {
        r.app.release(&last);
        let next = wait_for_one_new(&r.app, &names, &order);
        order.push(next.clone());
        last = next;
    }
    r.app.release(&last);
    assert_eq!(order, ["a1", "b1", "a2", "b2", "a3", "a4"]);
    for mut c in conns {
        assert_eq!(c.read().unwrap().status, 200);
    }
}

/// Waits until one more of `names` than `seen` has arrived at the app and
/// returns it (exactly one: the core has one place).
fn wait_for_one_new(app: &App, names: &[&str], seen: &[String]) -> String {
    let mut found = None;
    wait_until(
        "the next request reaches the app",
        Duration::from_secs(10),
        || {
            let new: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| app.has_arrived(n) && !seen.iter().any(|s| s == n))
                .collect();
            assert!(new.len() <= 1, "two admitted at once: {new:?}");
            found = new.first().map(|s| s.to_string());
            found.is_some()
        },
    );
    found.unwrap()
}

/// `max_connections_per_ip = 2`: a third connection from the same address
/// is closed at accept (counted, logged); another address is served. The
/// clients use 127.0.0.5: the receiver's tunnel comes from 127.0.0.1.
#[test]
fn max_connections_per_ip_refuses_at_accept() {
    let mut r = rig(&cfg(1, "max_connections_per_ip = 2\n"), false);
    let mut a = Conn::connect_from(r.gw.addr, ip(CLIENT));
    let mut b = Conn::connect_from(r.gw.addr, ip(CLIENT));
    assert_eq!(a.request("GET", "/alice/a", &[], b"").status, 200);
    assert_eq!(b.request("GET", "/alice/b", &[], b"").status, 200);
    let mut third = Conn::connect_from(r.gw.addr, ip(CLIENT));
    let _ = third.send("GET", "/alice/c", &[], b"");
    assert!(third.is_closed_by_peer(), "the third connection is closed");
    r.gw.proc
        .wait_log(&["connection refused: max_connections_per_ip reached"]);
    assert_eq!(
        metric(r.admin, "anp_connections_refused_total{reason=\"per_ip\"}"),
        1
    );
    let mut other = Conn::connect_from(r.gw.addr, ip("127.0.0.3"));
    assert_eq!(other.request("GET", "/alice/d", &[], b"").status, 200);
    // A place comes back when a connection closes.
    drop(a);
    wait_until(
        "a closed connection frees its place",
        Duration::from_secs(10),
        || {
            let mut c = Conn::connect_from(r.gw.addr, ip(CLIENT));
            c.send("GET", "/alice/e", &[], b"").is_ok() && c.read().is_ok_and(|x| x.status == 200)
        },
    );
}

/// A client that closes its connection while its request waits for the
/// app cancels the request at the receiver, and its place in flight is
/// free again: the next request is served, not shed.
#[test]
fn a_client_that_leaves_cancels_its_request_and_frees_its_place() {
    let extra = "max_inflight_per_identity = 1\nmax_queue_per_identity = 0\n";
    let mut r = rig(&cfg(1, extra), false);
    let c = r.hold("orphan");
    // The place is taken: another request is shed.
    assert_eq!(request(r.gw.addr, "GET", "/alice/x", &[], b"").status, 503);
    drop(c);
    r.rx[0]
        .proc
        .wait_log(&["request cancelled by the gateway", "client went away"]);
    // The receiver gave the call up: the app sees its connection close.
    r.app.wait_abandoned("orphan");
    wait_until("the place is free", Duration::from_secs(10), || {
        metric(r.admin, "anp_identity_in_flight{identity=\"alice\"}") == 0
    });
    assert_eq!(request(r.gw.addr, "GET", "/alice/y", &[], b"").status, 200);
}

/// A client that closes its connection while its request waits in the
/// identity's queue leaves the queue: when a place frees, its request is
/// not forwarded (the app never sees it), and the next one is served.
#[test]
fn a_client_that_leaves_the_queue_is_never_forwarded() {
    let extra = "max_inflight_per_identity = 1\nqueue_timeout = 60\n";
    let r = rig(&cfg(1, extra), false);
    let mut first = r.hold("first");
    let mut queued = Conn::connect(r.gw.addr);
    queued
        .send("GET", "/alice/queued", &[("X-Test-Hold", "queued")], b"")
        .unwrap();
    let depth = || metric(r.admin, "anp_identity_queue_depth{identity=\"alice\"}");
    wait_until("the request queued", Duration::from_secs(10), || {
        depth() == 1
    });
    drop(queued);
    wait_until(
        "the request to leave the queue with its client",
        Duration::from_secs(10),
        || depth() == 0,
    );
    r.app.release("first");
    assert_eq!(first.read().unwrap().status, 200);
    assert_eq!(
        request(r.gw.addr, "GET", "/alice/next", &[], b"").status,
        200
    );
    assert!(
        !r.app.has_arrived("queued"),
        "a request whose client left the queue reached the app"
    );
}

/// A client that closes its connection while its request waits for the
/// identity's tunnel to connect (`no_tunnel_wait`, an hour here) is let go
/// at once: the gateway closes its side with no answer, instead of holding
/// the descriptor for the rest of the wait. Both ways in: a request, and a
/// WebSocket upgrade to pass through (which wrote a `499` status line to
/// the half-closed client before). The gateway's descriptors come back.
#[test]
fn a_client_that_leaves_while_waiting_for_a_tunnel_is_let_go() {
    use std::io::{Read, Write};
    let r = rig(&cfg(1, "no_tunnel_wait = 3600\n"), false);
    let pid = r.gw.proc.pid();
    let fds_before = common::sys::fd_count(pid);
    let heads = [
        "GET /bob/waiting HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        "GET /bob/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            .to_string(),
    ];
    for head in heads {
        let mut c = std::net::TcpStream::connect(r.gw.addr).unwrap();
        c.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        c.write_all(head.as_bytes()).unwrap();
        // Waiting now, for a tunnel that does not come (bob has none) …
        wait_until("the request to wait", Duration::from_secs(10), || {
            common::sys::fd_count(pid) > fds_before
        });
        // … and the client leaves.
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let n = c.read_to_end(&mut got);
        assert!(
            matches!(n, Ok(0)),
            "{:?}: expected the gateway to close at once with no answer, got {n:?} {:?}",
            head.lines().next(),
            String::from_utf8_lossy(&got)
        );
        wait_until("the descriptor back", Duration::from_secs(10), || {
            common::sys::fd_count(pid) == fds_before
        });
    }
    // Alice, with her tunnel, is served meanwhile and after.
    assert_eq!(
        request(r.gw.addr, "GET", "/alice/after", &[], b"").status,
        200
    );
}

/// The same across cores: with two workers and one tunnel, a request
/// accepted on the core without it is handed to the other (the whole
/// request, through a channel). Its client leaving drops that call too,
/// and the receiver gives the app call up, long before `timeout` (an
/// hour here); the requests held beside it are served when released.
#[test]
fn a_client_that_leaves_cancels_its_request_across_cores() {
    let app = App::start();
    let config = GatewayConfig {
        timeout: 3600.0,
        ..cfg(2, "")
    };
    let (gw, admin) = Gateway::start_with_admin(&config);
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    let crossed = || metric(admin, "anp_proxy_cross_core_dispatch_total");
    // Held requests on new connections until one has crossed (which
    // core accepts a connection is the kernel's choice).
    let mut held = Vec::new();
    for i in 0.. {
        assert!(
            i < 64,
            "64 connections and none accepted on the core without the tunnel"
        );
        let before = crossed();
        let name = format!("held-{i}");
        let mut c = Conn::connect(gw.addr);
        c.send(
            "GET",
            &format!("/alice/{name}"),
            &[("X-Test-Hold", &name)],
            b"",
        )
        .unwrap();
        app.wait_arrived(&name);
        if crossed() > before {
            // This one crossed: its client leaves.
            drop(c);
            app.wait_abandoned(&name);
            rx.proc
                .wait_log(&["request cancelled by the gateway", "client went away"]);
            break;
        }
        held.push((name, c));
    }
    for (name, mut c) in held {
        app.release(&name);
        assert_eq!(c.read().unwrap().status, 200, "{name}");
    }
    wait_until("nothing left in flight", Duration::from_secs(10), || {
        metric(admin, "anp_requests_in_flight") == 0
    });
}

/// And for a WebSocket upgrade waiting for the app's answer (101 or not):
/// its client leaving cancels the app call long before `timeout`.
#[test]
fn a_client_that_leaves_an_upgrade_cancels_it() {
    use std::io::Write;
    let config = GatewayConfig {
        timeout: 3600.0,
        ..cfg(1, "")
    };
    let mut r = rig(&config, false);
    let mut c = std::net::TcpStream::connect(r.gw.addr).unwrap();
    c.write_all(
        b"GET /alice/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          X-Test-Hold: upgrade\r\n\r\n",
    )
    .unwrap();
    r.app.wait_arrived("upgrade");
    drop(c);
    r.app.wait_abandoned("upgrade");
    r.rx[0]
        .proc
        .wait_log(&["request cancelled by the gateway", "client went away"]);
    assert_eq!(
        request(r.gw.addr, "GET", "/alice/after", &[], b"").status,
        200
    );
}

/// A request queued for a place in flight gives up after `queue_timeout`
/// with 503 + Retry-After (counted as `queue_timeout`), while the request
/// holding the place is still at the app: nothing else has happened to
/// wake the queued one. Both ways in (a request, an upgrade).
#[test]
fn a_queued_request_gives_up_after_queue_timeout() {
    let extra = "max_inflight_per_identity = 1\nmax_queue_per_identity = 8\nqueue_timeout = 0.5\n";
    let r = rig(&cfg(1, extra), false);
    let mut holder = r.hold("holder");
    let queued = request(r.gw.addr, "GET", "/alice/queued", &[], b"");
    assert_eq!(queued.status, 503, "{}", queued.summary());
    assert!(
        queued.header("retry-after").is_some(),
        "{}",
        queued.summary()
    );
    let upgrade = request(
        r.gw.addr,
        "GET",
        "/alice/ws",
        &[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"",
    );
    assert_eq!(upgrade.status, 503, "{}", upgrade.summary());
    assert_eq!(
        metric(r.admin, "anp_shed_total{reason=\"queue_timeout\"}"),
        2
    );
    assert!(!r.app.has_arrived("queued"));
    r.app.release("holder");
    assert_eq!(holder.read().unwrap().status, 200);
}

/// A response to a request handed to another core streams across: it is
/// not gathered on the tunnel's core first, so one larger than
/// `max_body_size` (1 MiB here) arrives whole and intact, as it does on
/// the tunnel's own core (it was answered 502 before).
#[test]
fn a_large_response_streams_across_cores() {
    const LEN: usize = 4 << 20;
    let app = App::start();
    let config = GatewayConfig {
        max_body_size: 1 << 20,
        ..cfg(2, "")
    };
    let (gw, admin) = Gateway::start_with_admin(&config);
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    let crossed = || metric(admin, "anp_proxy_cross_core_dispatch_total");
    let want = common::app::sha256_hex(&common::app::pattern_body(LEN));
    let mut seen = [false, false];
    for i in 0.. {
        assert!(i < 64, "64 connections and not both cores seen");
        let before = crossed();
        let r = request(
            gw.addr,
            "GET",
            &format!("/alice/big/{i}"),
            &[("X-Test-Body-Len", &LEN.to_string())],
            b"",
        );
        let across = crossed() > before;
        assert_eq!(r.status, 200, "across cores: {across}; {}", r.summary());
        assert_eq!(r.body.len(), LEN);
        assert_eq!(
            common::app::sha256_hex(&r.body),
            want,
            "across cores: {across}"
        );
        seen[usize::from(across)] = true;
        if seen == [true, true] {
            break;
        }
    }
}
