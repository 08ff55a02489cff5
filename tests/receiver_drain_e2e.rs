//! The receiver's graceful shutdown (issue #16): SIGTERM or SIGINT lets
//! the requests in flight finish, tells the gateway the tunnel is
//! draining so no new request is sent to it (PROTOCOL.md §7.4), then
//! closes the tunnels and exits 0; past `shutdown_grace` what is still in
//! flight is abandoned, and logged. Real binaries; the tests wait on log
//! lines and exits, never on time.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::procs::ReceiverConfig;
use common::{client, App, Gateway, GatewayConfig, Receiver, Setup, ALICE_TOKEN};

const WAIT: Duration = Duration::from_secs(30);

/// The receiver's log line once the gateway has read its draining notice.
const HEARD: &str = "the gateway sends no new requests on this tunnel";

#[test]
fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let Setup { app, gw, mut rx } = Setup::new();
    let addr = gw.addr;
    let held = thread::spawn(move || {
        client::request(addr, "GET", "/alice/held", &[("X-Test-Hold", "held")], b"")
    });
    app.wait_arrived("held");

    rx.proc.signal(libc::SIGTERM);
    rx.proc.wait_log(&[HEARD, "in_flight=1"]);
    assert!(
        rx.proc.exited().is_none(),
        "the receiver exited with a request in flight"
    );
    app.release("held");
    let r = held.join().unwrap();
    assert_eq!(
        r.status,
        200,
        "the request in flight completes: {}",
        r.summary()
    );
    rx.proc.wait_log(&["drained: closing the tunnel"]);
    let status = rx.proc.wait_exit(WAIT);
    assert!(status.success(), "a shutdown exits 0, got {status}");
}

#[test]
fn a_draining_receiver_gets_no_new_requests_its_twin_serves_them() {
    let app_a = App::saying(|r| format!("A saw {}", r.target_text()).into_bytes());
    let app_b = App::saying(|r| format!("B saw {}", r.target_text()).into_bytes());
    let gw = Gateway::start_default();
    let mut a = Receiver::start(gw.addr, app_a.addr, ALICE_TOKEN, 1);
    a.wait_connected(1);
    // Held at A's app (A's is the only tunnel yet): it keeps A draining.
    let addr = gw.addr;
    let held = thread::spawn(move || {
        client::request(addr, "GET", "/alice/held", &[("X-Test-Hold", "held")], b"")
    });
    app_a.wait_arrived("held");
    // A second instance of the same identity (its own instance id; the
    // default duplicate_tunnels = "share" lets both serve).
    let mut b = Receiver::start(gw.addr, app_b.addr, ALICE_TOKEN, 1);
    b.wait_connected(1);

    a.proc.signal(libc::SIGINT);
    a.proc.wait_log(&[HEARD]);
    // New connections spread over the gateway's cores and its tunnels:
    // had A's tunnel still been chosen, some would reach A's app.
    for i in 0..8 {
        let r = client::request(gw.addr, "GET", &format!("/alice/new{i}"), &[], b"");
        assert_eq!(r.status, 200, "new request {i}: {}", r.summary());
        assert_eq!(r.body_text(), format!("B saw /alice/new{i}"));
    }
    assert!(
        app_a.requests_to("/alice/new").is_empty(),
        "a draining receiver was sent new requests"
    );
    assert!(
        a.proc.exited().is_none(),
        "A exited with a request in flight"
    );

    app_a.release("held");
    let r = held.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.summary());
    assert_eq!(r.body_text(), "A saw /alice/held");
    let status = a.proc.wait_exit(WAIT);
    assert!(status.success(), "a shutdown exits 0, got {status}");
    assert!(b.proc.exited().is_none());
}

#[test]
fn a_draining_last_tunnel_leaves_new_requests_to_the_no_tunnel_path() {
    let mut cfg = GatewayConfig::default();
    cfg.extra_gateway_toml += "no_tunnel_wait = 0.2\n";
    let Setup { app, gw, mut rx } = Setup::with(&cfg, 1);
    let addr = gw.addr;
    let held = thread::spawn(move || {
        client::request(addr, "GET", "/alice/held", &[("X-Test-Hold", "held")], b"")
    });
    app.wait_arrived("held");

    rx.proc.signal(libc::SIGTERM);
    rx.proc.wait_log(&[HEARD]);
    let r = client::request(gw.addr, "GET", "/alice/new", &[], b"");
    assert_eq!(
        r.status,
        503,
        "no tunnel takes new requests: {}",
        r.summary()
    );
    assert!(app.requests_to("/alice/new").is_empty());

    app.release("held");
    assert_eq!(held.join().unwrap().status, 200);
    let status = rx.proc.wait_exit(WAIT);
    assert!(status.success(), "a shutdown exits 0, got {status}");
}

#[test]
fn past_shutdown_grace_requests_are_abandoned_and_the_receiver_exits() {
    let app = App::start();
    let gw = Gateway::start_default();
    let mut cfg = ReceiverConfig::new(gw.addr, app.addr, ALICE_TOKEN, 1);
    cfg.extra_toml += "shutdown_grace = 1\n";
    let mut rx = Receiver::start_with(&cfg);
    rx.wait_connected(1);
    let addr = gw.addr;
    // Never released.
    let held = thread::spawn(move || {
        client::request(
            addr,
            "GET",
            "/alice/forever",
            &[("X-Test-Hold", "forever")],
            b"",
        )
    });
    app.wait_arrived("forever");

    let signalled = Instant::now();
    rx.proc.signal(libc::SIGTERM);
    rx.proc
        .wait_log(&["requests in flight abandoned", "abandoned=1"]);
    // Bounded by shutdown_grace (and a margin), not by the held request.
    let status = rx.proc.wait_exit(Duration::from_secs(5));
    let took = signalled.elapsed();
    assert!(status.success(), "a shutdown exits 0, got {status}");
    assert!(
        took >= Duration::from_secs(1),
        "it exited after {took:?}, before shutdown_grace"
    );
    let r = held.join().unwrap();
    assert_eq!(
        r.status,
        502,
        "the abandoned request fails at the gateway: {}",
        r.summary()
    );
}
