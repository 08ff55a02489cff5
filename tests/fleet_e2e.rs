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
//! - `a_did_proof_accepted_by_one_gateway_is_a_replay_at_another`: two
//!   gateways sharing one SQLite registry file; a DID-WBA upgrade header
//!   that one accepted (101) is refused by the other (401 nonce_replayed),
//!   and by the first too.
//!
//! - `proxy_protocol_names_the_client_to_the_app_the_log_and_the_limits`:
//!   a gateway with `proxy_protocol = true`; v1 and v2 headers; the client
//!   address they carry reaches the app's `X-Forwarded-For` and
//!   `Forwarded`, the access log, and `max_connections_per_ip` (counted per
//!   PROXY client, not per balancer); a connection without the header is
//!   refused and logged with its reason.
//!
//! - `health_says_draining_with_503_once_a_drain_has_begun`: the admin
//!   port's `/health` is 200 `ok` while the gateway accepts and 503
//!   `draining` once SIGTERM started the drain (asked on a connection the
//!   admin port took before it closed), while a request in flight finishes.
//!
//! Real binaries on real sockets, ports 0; every wait is on a line or a
//! response, never a sleep.

mod common;

use std::path::Path;

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

/// `anp-proxy did new DID --out dir`, and the document copied to where
/// `did_documents_dir = docs` looks for it.
fn did_new(dir: &Path, docs: &Path, did: &str) {
    let out = common::procs::run(["did", "new", did, "--out", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "did new: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut p = docs.to_path_buf();
    for part in did.strip_prefix("did:wba:").unwrap().split(':') {
        p.push(part);
    }
    std::fs::create_dir_all(&p).unwrap();
    std::fs::copy(dir.join("did.json"), p.join("did.json")).unwrap();
}

/// A raw WebSocket upgrade carrying `auth`: the status and the body.
fn upgrade(gw: std::net::SocketAddr, auth: &str) -> (u16, String) {
    let mut req = Vec::new();
    anp_proxy::ws::handshake::write_client_request(
        &mut req,
        &gw.to_string(),
        "/ws",
        "dGhlIHNhbXBsZSBub25jZQ==",
        &[("Authorization", auth)],
    );
    let r = client::send_raw(gw, &req);
    (r.status, r.body_text())
}

#[test]
fn a_did_proof_accepted_by_one_gateway_is_a_replay_at_another() {
    use anp_proxy::auth::didwba::{self, DidSigner};
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let did = "did:wba:agents.test:fleet:k";
    did_new(&t.join("k"), &t.join("docs"), did);
    let extra = format!(
        "auth.did_documents_dir = {:?}\nauth.dids = [{{ did = \"{did}\", paths = [\"/k\"] }}]\n\
         database.backend = \"sqlite\"\ndatabase.path = {:?}\n",
        t.join("docs").to_str().unwrap(),
        t.join("fleet.db").to_str().unwrap()
    );
    let cfg = GatewayConfig {
        workers: 1,
        extra_gateway_toml: extra,
        ..GatewayConfig::default()
    };
    let a = Gateway::start(&cfg);
    let b = Gateway::start(&cfg);
    let signer = DidSigner::load(&t.join("k/did.json"), &t.join("k/key-1_private.pem")).unwrap();
    // `service` is the Host without its port: one header fits both.
    let header = signer.didwba_header(
        "127.0.0.1",
        &didwba::sign::fresh_nonce(),
        &didwba::time::format_utc(didwba::time::now_unix()),
    );
    let (status, body) = upgrade(a.addr, &header);
    assert_eq!(status, 101, "gateway A accepts the proof: {body}");
    let (status, body) = upgrade(b.addr, &header);
    assert_eq!(status, 401, "gateway B refuses the replay: {body}");
    assert!(body.contains("nonce_replayed"), "{body}");
    let (status, body) = upgrade(a.addr, &header);
    assert_eq!(status, 401, "and so does A: {body}");
    // A fresh proof still opens a tunnel on B.
    let fresh = signer.didwba_header(
        "127.0.0.1",
        &didwba::sign::fresh_nonce(),
        &didwba::time::format_utc(didwba::time::now_unix()),
    );
    assert_eq!(upgrade(b.addr, &fresh).0, 101);
}

/// A v2 PROXY header (TCP over IPv4) for `src` → `dst`.
fn v2_header(src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4) -> Vec<u8> {
    let mut b = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    b.extend_from_slice(&src.ip().octets());
    b.extend_from_slice(&dst.ip().octets());
    b.extend_from_slice(&src.port().to_be_bytes());
    b.extend_from_slice(&dst.port().to_be_bytes());
    b
}

#[test]
fn proxy_protocol_names_the_client_to_the_app_the_log_and_the_limits() {
    let app = App::start();
    let cfg = GatewayConfig {
        workers: 1,
        // Per listener: the tunnel port takes receivers without a header.
        extra_gateway_toml: "proxy_protocol = true\nmax_connections_per_ip = 1\ntunnel_port = 0\n"
            .into(),
        ..GatewayConfig::default()
    };
    let mut gw = Gateway::start(&cfg);
    let tunnels = gw.proc.wait_stdout("anp-proxy gateway tunnels on ws://");
    let tunnel_addr = common::procs::addr_in(&tunnels);
    let mut rx = Receiver::start(tunnel_addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);

    // v1: the app and the access log see 203.0.113.9.
    let mut c = client::Conn::connect(gw.addr);
    c.write_raw(b"PROXY TCP4 203.0.113.9 127.0.0.1 40001 80\r\n", &[])
        .unwrap();
    let r = c.request("GET", "/alice/pp-v1", &[], b"");
    assert_eq!(r.status, 200, "{}", r.summary());
    let seen = &app.requests_to("/alice/pp-v1")[0];
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9"),
        "{seen:?}"
    );
    let fwd = seen.header("forwarded").unwrap_or_default();
    assert!(fwd.contains("for=203.0.113.9"), "Forwarded: {fwd}");
    let line = gw.proc.wait_line("the access line of /alice/pp-v1", |l| {
        l.contains("/alice/pp-v1")
    });
    assert!(line.contains("\"client\":\"203.0.113.9:40001\""), "{line}");

    // Per-IP limit of 1, per PROXY client: 203.0.113.9 already holds `c`,
    // so a second connection of it is refused; 198.51.100.7 (v2) is not.
    let mut again = client::Conn::connect(gw.addr);
    again
        .write_raw(b"PROXY TCP4 203.0.113.9 127.0.0.1 40002 80\r\n", &[])
        .unwrap();
    assert!(
        again.is_closed_by_peer(),
        "second connection of 203.0.113.9"
    );
    gw.proc
        .wait_log(&["connection refused", "max_connections_per_ip"]);
    let mut other = client::Conn::connect(gw.addr);
    let hdr = v2_header(
        "198.51.100.7:40003".parse().unwrap(),
        "127.0.0.1:80".parse().unwrap(),
    );
    other.write_raw(&hdr, &[]).unwrap();
    let r = other.request("GET", "/alice/pp-v2", &[], b"");
    assert_eq!(r.status, 200, "{}", r.summary());
    let seen = &app.requests_to("/alice/pp-v2")[0];
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("198.51.100.7"),
        "{seen:?}"
    );
    drop(c);

    // No header: refused, and the log says why.
    let mut bare = client::Conn::connect(gw.addr);
    bare.write_raw(b"GET /alice/bare HTTP/1.1\r\nHost: x\r\n\r\n", &["GET"])
        .unwrap();
    assert!(bare.is_closed_by_peer(), "a connection without the header");
    gw.proc
        .wait_log(&["no valid PROXY protocol header", "proxy_header_missing"]);
    assert!(app.requests_to("/alice/bare").is_empty());
}

#[test]
fn health_says_draining_with_503_once_a_drain_has_begun() {
    let app = App::start();
    let cfg = GatewayConfig {
        workers: 1,
        extra_gateway_toml: "admin_header_timeout = 60\n".into(),
        ..GatewayConfig::default()
    };
    let (mut gw, admin) = Gateway::start_with_admin(&cfg);
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    let r = client::request(admin, "GET", "/health", &[], b"");
    assert_eq!(r.status, 200, "{}", r.summary());
    assert!(
        r.body_text().contains("\"status\":\"ok\""),
        "{}",
        r.summary()
    );
    // A request in flight keeps the draining gateway alive.
    let addr = gw.addr;
    let held = std::thread::spawn(move || {
        client::request(addr, "GET", "/alice/held", &[("X-Test-Hold", "h")], b"")
    });
    app.wait_arrived("h");
    let mut asking = client::Conn::connect(admin);
    gw.signal(libc::SIGTERM);
    gw.proc.wait_log(&["admin listener closed (draining)"]);
    let r = asking.request("GET", "/health", &[], b"");
    assert_eq!(r.status, 503, "{}", r.summary());
    assert!(
        r.body_text().contains("\"status\":\"draining\""),
        "{}",
        r.summary()
    );
    app.release("h");
    assert_eq!(held.join().unwrap().status, 200);
}
