//! A fleet of gateways (issue 13): one receiver attached to every gateway
//! of its `gateway_url` list, each gateway with its own tunnel set, state
//! and backoff.
//!
//! - `one_receiver_serves_through_every_gateway_and_survives_one_lost`:
//!   two gateways, one receiver listing both; each gateway serves; after a
//!   SIGKILL of one, the receiver logs that gateway down (and only that
//!   one), the other keeps serving, and the killed one's slots back off on
//!   their own.
//!
//! Real binaries on real sockets, ports 0; every wait is on a line or a
//! response, never a sleep.

mod common;

use common::procs::ReceiverConfig;
use common::{client, App, Gateway, GatewayConfig, Receiver, ALICE_TOKEN};

#[test]
fn one_receiver_serves_through_every_gateway_and_survives_one_lost() {
    let app = App::start();
    let cfg = GatewayConfig {
        workers: 1,
        ..GatewayConfig::default()
    };
    let mut a = Gateway::start(&cfg);
    let b = Gateway::start(&cfg);
    let mut rc = ReceiverConfig::new(a.addr, app.addr, ALICE_TOKEN, 2);
    // One string with a comma: the form an environment variable can give.
    rc.gateway_url = format!("{}, {}", a.ws_url(), b.ws_url());
    let mut rx = Receiver::start_with(&rc);
    // Two tunnels to each gateway.
    rx.wait_connected(4);
    // Per-gateway status in the log: each with both of its tunnels up.
    let mut up = [false, false];
    let urls = [a.ws_url(), b.ws_url()];
    rx.proc
        .wait_log_where("`gateway status … tunnels_up=2` for both", |l| {
            for (i, u) in urls.iter().enumerate() {
                up[i] |= l.contains("gateway status")
                    && l.contains(u.as_str())
                    && l.contains("tunnels_up=2");
            }
            up == [true, true]
        });
    for gw in [&a, &b] {
        let r = client::request(gw.addr, "GET", "/alice/x", &[], b"");
        assert_eq!(r.status, 200, "through {}: {}", gw.addr, r.summary());
    }
    a.kill();
    let down = rx
        .proc
        .wait_log(&["gateway down", "no tunnel connected to it"]);
    assert!(down.contains(&a.ws_url()), "{down}");
    assert!(!down.contains(&b.ws_url()), "{down}");
    rx.proc.wait_log(&["reconnecting", &a.ws_url()]);
    for _ in 0..20 {
        let r = client::request(b.addr, "GET", "/alice/y", &[], b"");
        assert_eq!(r.status, 200, "through {}: {}", b.addr, r.summary());
    }
    assert!(
        rx.proc
            .stderr_lines(0)
            .iter()
            .all(|l| !(l.contains("gateway down") && l.contains(&b.ws_url()))),
        "the surviving gateway was never down"
    );
}
