//! The receiver's admin listener (issue #16): `/health` says whether the
//! gateway can reach this app through a tunnel now, `/metrics` counts
//! tunnels, connects and failures per gateway address, and requests,
//! upstream errors and requests in flight. The real gateway and receiver;
//! the receiver's admin port is 0 and read from its start line.

mod common;

use std::net::SocketAddr;

use common::procs::{addr_in, ReceiverConfig};
use common::{client, App, Gateway, GatewayConfig, Receiver, ALICE_TOKEN};

/// A receiver with its admin listener on a free port: (receiver, admin).
fn receiver_with_admin(
    gateway: SocketAddr,
    upstream: &str,
    tunnels: u32,
) -> (Receiver, SocketAddr) {
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut cfg = ReceiverConfig::new(gateway, unused, ALICE_TOKEN, tunnels);
    cfg.upstream = upstream.to_owned();
    cfg.extra_toml = "admin_port = 0\n".into();
    let mut rx = Receiver::start_with(&cfg);
    let line = rx
        .proc
        .wait_stdout("anp-proxy receiver admin listening on http://");
    (rx, addr_in(&line))
}

fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    let r = client::request(admin, "GET", path, &[], b"");
    (r.status, r.body_text())
}

/// The value of the metric line that starts with `series` (name and
/// labels).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[test]
fn health_and_metrics_follow_tunnels_and_requests() {
    let app = App::start();
    let gw = Gateway::start(&GatewayConfig::default());
    let (mut rx, admin) = receiver_with_admin(gw.addr, &format!("http://{}", app.addr), 2);
    rx.wait_connected(2);
    let (status, body) = get(admin, "/health");
    assert_eq!(status, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (h["status"].as_str(), h["tunnels"].as_u64()),
        (Some("ok"), Some(2))
    );
    let label = format!("ws://{}/ws", gw.addr);
    assert_eq!(h["gateways"][0]["gateway"].as_str(), Some(label.as_str()));

    for i in 0..3 {
        let r = client::request(gw.addr, "GET", &format!("/alice/m{i}"), &[], b"");
        assert_eq!(r.status, 200);
    }
    let (status, text) = get(admin, "/metrics");
    assert_eq!(status, 200);
    let gw_label = format!("{{gateway=\"{label}\"}}");
    assert_eq!(metric(&text, &format!("anp_receiver_tunnels{gw_label}")), 2);
    assert_eq!(
        metric(
            &text,
            &format!("anp_receiver_tunnel_connects_total{gw_label}")
        ),
        2
    );
    assert_eq!(metric(&text, "anp_receiver_requests_total"), 3);
    assert_eq!(metric(&text, "anp_receiver_upstream_errors_total"), 0);
    assert_eq!(metric(&text, "anp_receiver_requests_in_flight"), 0);
    assert_eq!(
        metric(&text, "anp_receiver_metrics_cores"),
        metric(&text, "anp_receiver_cores")
    );
    assert_eq!(get(admin, "/nope").0, 404);
}

#[test]
fn upstream_errors_are_counted_and_no_tunnel_is_unhealthy() {
    let gw = Gateway::start(&GatewayConfig::default());
    // Nothing listens on the app's port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let (mut rx, admin) = receiver_with_admin(gw.addr, &upstream, 1);
    rx.wait_connected(1);
    for _ in 0..2 {
        let r = client::request(gw.addr, "GET", "/alice/x", &[], b"");
        assert_eq!(r.status, 502);
    }
    let (_, text) = get(admin, "/metrics");
    assert_eq!(metric(&text, "anp_receiver_requests_total"), 2);
    assert_eq!(metric(&text, "anp_receiver_upstream_errors_total"), 2);

    // A receiver whose gateway is not there: no tunnel, 503.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = nobody.local_addr().unwrap();
    drop(nobody);
    let (mut lone, lone_admin) = receiver_with_admin(nowhere, &upstream, 1);
    lone.proc.wait_log(&["tunnel down"]);
    let (status, body) = get(lone_admin, "/health");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"status\":\"no_tunnel\""), "{body}");
    let (_, text) = get(lone_admin, "/metrics");
    let label = format!("{{gateway=\"ws://{nowhere}/ws\"}}");
    assert!(
        metric(
            &text,
            &format!("anp_receiver_tunnel_connect_failures_total{label}")
        ) >= 1
    );
}
