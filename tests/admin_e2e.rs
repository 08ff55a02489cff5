//! The admin listener of the real gateway binary (`src/gateway/admin.rs`):
//! connections are served concurrently, so silent ones (up to
//! `admin_max_connections` - 1) never stop `/stats`; one past the cap is
//! answered 503 with a log line saying why; a connection that sends no
//! head is closed after `admin_header_timeout`; `/health` there has the
//! details the public `/health` keeps to itself.
//!
//! Silent connections are held for the whole test (a long
//! `admin_header_timeout`), and each one is checked to be still open after
//! `/stats` answered: served one after another, `/stats` would only come
//! once they were given up on.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::client::{self, Conn};
use common::wait_until;
use common::{App, Gateway, GatewayConfig, Receiver, ALICE_TOKEN};

const WAIT: Duration = Duration::from_secs(30);

fn admin_gateway(extra: &str) -> (Gateway, SocketAddr) {
    let mut cfg = GatewayConfig::default();
    cfg.extra_gateway_toml += extra;
    Gateway::start_with_admin(&cfg)
}

/// True when the server has neither answered nor closed `s` yet.
fn still_waiting(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let r = (&*s).read(&mut b);
    s.set_nonblocking(false).unwrap();
    matches!(r, Err(e) if e.kind() == ErrorKind::WouldBlock)
}

/// `GET /stats` answers 200 with JSON; returns once the server closed the
/// connection (its slot is free by then).
fn stats_ok(admin: SocketAddr) {
    let mut c = Conn::connect(admin);
    let r = c.request("GET", "/stats", &[], b"");
    assert_eq!(r.status, 200, "GET /stats: {}", r.summary());
    assert!(c.is_closed_by_peer(), "admin closes after each answer");
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("GET /stats: expected JSON: {e}: {}", r.summary()));
    assert!(v["tunnels"].is_u64(), "GET /stats: no `tunnels` in {v}");
}

#[test]
fn silent_admin_connections_do_not_stop_stats() {
    const CAP: usize = 4;
    let (_gw, admin) = admin_gateway(&format!(
        "admin_header_timeout = 600\nadmin_max_connections = {CAP}\n"
    ));
    let mut silent = vec![TcpStream::connect(admin).unwrap()];
    stats_ok(admin);
    assert!(
        still_waiting(&silent[0]),
        "the silent connection must still be open while /stats was served"
    );
    // As many as the cap allows beside the one serving /stats.
    while silent.len() < CAP - 1 {
        silent.push(TcpStream::connect(admin).unwrap());
    }
    stats_ok(admin);
    stats_ok(admin);
    for (i, s) in silent.iter().enumerate() {
        assert!(still_waiting(s), "silent connection {i} was closed early");
    }
}

#[test]
fn past_admin_max_connections_the_next_gets_503_and_a_log_line() {
    const CAP: usize = 4;
    let (gw, admin) = admin_gateway(&format!(
        "admin_header_timeout = 600\nadmin_max_connections = {CAP}\n"
    ));
    // Accepted in the order they connect, one at a time: every silent one
    // holds its slot before the next connection is looked at.
    let mut silent: Vec<TcpStream> = (0..CAP)
        .map(|_| TcpStream::connect(admin).unwrap())
        .collect();
    let r = client::request(admin, "GET", "/stats", &[], b"");
    assert_eq!(
        r.status,
        503,
        "with {CAP} admin connections held: {}",
        r.summary()
    );
    assert!(
        r.body_text().contains("admin_max_connections"),
        "{}",
        r.summary()
    );
    wait_until("the gateway to log why it refused", WAIT, || {
        gw.proc
            .stderr_lines(0)
            .iter()
            .any(|l| l.contains("admin connection refused") && l.contains("admin_max_connections"))
    });
    for (i, s) in silent.iter().enumerate() {
        assert!(still_waiting(s), "silent connection {i} was closed early");
    }
    // One slot freed: served again (its thread notices the close first).
    drop(silent.pop());
    wait_until("/stats served again after a slot was freed", WAIT, || {
        client::request(admin, "GET", "/stats", &[], b"").status == 200
    });
}

#[test]
fn a_silent_admin_connection_is_closed_after_admin_header_timeout() {
    let (_gw, admin) = admin_gateway("admin_header_timeout = 0.5\n");
    let mut c = Conn::connect(admin);
    c.set_read_timeout(WAIT);
    // Nothing sent: the answer comes from the timeout alone.
    let r = c.read().expect("a 408 after admin_header_timeout");
    assert_eq!(r.status, 408, "{}", r.summary());
    assert!(c.is_closed_by_peer(), "closed after the 408");
    stats_ok(admin);
}

#[test]
fn admin_health_has_the_details_the_public_health_keeps() {
    let app = App::start();
    let (gw, admin) = admin_gateway("");
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);

    let r = client::request(admin, "GET", "/health", &[], b"");
    assert_eq!(r.status, 200, "admin GET /health: {}", r.summary());
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("admin GET /health: expected JSON: {e}: {}", r.summary()));
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["tunnels"], 1, "{v}");
    assert_eq!(v["pid"], gw.proc.pid(), "{v}");

    let p = client::request(gw.addr, "GET", "/health", &[], b"");
    assert_eq!(p.status, 200, "public GET /health: {}", p.summary());
    assert_eq!(p.body, b"ok\n", "public GET /health: {}", p.summary());
}
