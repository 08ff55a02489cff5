//! What a refusal says, and to whom (issue #16, items 8 and 9): a public
//! client gets a generic reason for a 5xx, never the upstream's address,
//! an OS error or a host name, while the gateway's log and access log keep
//! the detail; a receiver that dials the wrong path is told the tunnel
//! path; a receiver that dials `wss://` to a plain-TCP port is told that
//! the gateway does not speak TLS there.
//!
//! Real binaries on port 0; every wait is on a line the processes print.

mod common;

use std::net::TcpListener;

use common::procs::{Receiver, ReceiverConfig};
use common::{Gateway, GatewayConfig, ALICE_TOKEN};

/// An address nothing listens on (bound, then closed).
fn closed_port() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[test]
fn a_502_tells_the_client_nothing_internal_and_the_log_everything() {
    let mut gw = Gateway::start(&GatewayConfig {
        logging_toml: "level = \"info\"\nlog_dir = \"\"\naccess_log = true\n".into(),
        ..GatewayConfig::default()
    });
    let upstream = closed_port();
    let mut rx = Receiver::start(gw.addr, upstream, ALICE_TOKEN, 1);
    rx.wait_connected(1);

    let r = common::client::request(gw.addr, "GET", "/alice/x", &[], b"");
    assert_eq!(r.status, 502, "{}", r.summary());
    let body = r.body_text();
    let v: serde_json::Value = serde_json::from_str(&body).expect(&body);
    // The shape of the gateway's error bodies is kept: a kind, a sentence.
    assert_eq!(v["error"], "receiver_error", "{body}");
    assert_eq!(
        v["message"], "the service behind this route did not answer",
        "{body}"
    );
    for leak in [
        upstream.to_string().as_str(),
        "127.0.0.1",
        "os error",
        "refused",
        "upstream",
    ] {
        assert!(!body.contains(leak), "the body leaks {leak:?}: {body}");
    }

    // The log has the detail: the upstream's address and the OS error.
    let addr = upstream.to_string();
    let line = gw
        .proc
        .wait_log_where("the `request failed` line with the detail", |l| {
            l.contains("request failed") && l.contains(&addr)
        });
    assert!(line.contains("os error"), "{line}");
    // So has the access log (stdout here: no log_dir).
    let access = gw.proc.wait_line("the access-log line of the 502", |l| {
        l.contains("\"status\":502")
    });
    let a: serde_json::Value = serde_json::from_str(&access).expect(&access);
    let detail = a["error"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&addr) && detail.contains("os error"),
        "{access}"
    );
}

#[test]
fn a_receiver_on_the_wrong_path_is_told_the_tunnel_path() {
    let gw = Gateway::start(&GatewayConfig::default());
    let app = closed_port();
    let mut cfg = ReceiverConfig::new(gw.addr, app, ALICE_TOKEN, 1);
    cfg.gateway_url = format!("ws://{}/tunnel", gw.addr);
    cfg.extra_toml += "reconnect_max_delay = 0.5\n";
    let mut rx = Receiver::start_with(&cfg);
    let line = rx
        .proc
        .wait_log_where("the gateway's refusal of the upgrade", |l| {
            l.contains("gateway refused the tunnel")
        });
    assert!(line.contains("501"), "{line}");
    assert!(line.contains("tunnels are opened on /ws"), "{line}");
}

#[test]
fn wss_to_a_plain_gateway_says_the_port_does_not_speak_tls() {
    let gw = Gateway::start(&GatewayConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let mut cfg = ReceiverConfig::new(gw.addr, closed_port(), ALICE_TOKEN, 1);
    cfg.gateway_url = format!("wss://{}/ws", gw.addr);
    cfg.extra_toml += &format!(
        "reconnect_max_delay = 0.5\nca_file = {}\n",
        serde_json::to_string(&ca_path.display().to_string()).unwrap()
    );
    let mut rx = Receiver::start_with(&cfg);
    let line = rx.proc.wait_log_where("the tunnel's failure", |l| {
        l.contains("tunnel down") || l.contains("tunnel refused")
    });
    assert!(
        line.contains("does not speak TLS on that port") && line.contains(&gw.addr.to_string()),
        "{line}"
    );
    assert!(!line.contains("InvalidContentType"), "{line}");
}
