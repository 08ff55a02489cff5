//! The local app reached the other ways `receiver.upstream` names it
//! (issue #16): over TLS (`https://`, its certificate verified against the
//! CA that `anp-proxy cert new` made), over a unix-domain socket
//! (`unix:/path`), and with its `Host` rewritten (`upstream_host`).
//!
//! Each runs the real gateway and receiver; the app is the test app of
//! `common::app` on TLS, a unix socket or TCP. Pooling is shown by the
//! app's count of accepted connections, never by timing.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::procs::ReceiverConfig;
use common::{client, App, Gateway, GatewayConfig, Receiver, ALICE_TOKEN};

/// `cert new 127.0.0.1 localhost --out DIR`: (ca.crt, app.crt, app.key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    common::procs::cert_new(dir, "app")
}

/// A gateway and an alice receiver calling `upstream`, with `extra` in
/// its `[receiver]` table; the tunnel is up.
fn through(upstream: &str, extra: &str) -> (Gateway, Receiver) {
    let gw = Gateway::start(&GatewayConfig::default());
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut cfg = ReceiverConfig::new(gw.addr, unused, ALICE_TOKEN, 1);
    cfg.upstream = upstream.to_owned();
    cfg.extra_toml = extra.to_owned();
    let mut rx = Receiver::start_with(&cfg);
    rx.wait_connected(1);
    (gw, rx)
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.to_str().unwrap())
}

/// Three requests on one client connection: two GETs and a POST whose
/// 200 KiB body comes back whole. The app served them all on one
/// connection (the receiver pooled it) and saw the client's Host.
fn three_requests_one_app_connection(gw: &Gateway, app: &App) {
    let mut c = client::Conn::connect(gw.addr);
    for i in 0..2 {
        let r = c.request("GET", &format!("/alice/get{i}"), &[], b"");
        assert_eq!(r.status, 200, "{}", r.summary());
    }
    let body = common::app::pattern_body(200 * 1024);
    let r = c.request("POST", "/alice/post", &[], &body);
    assert_eq!(r.status, 200, "{}", r.summary());
    assert!(r.body == body, "the echoed body differs");
    let seen = app.requests();
    assert_eq!(seen.len(), 3);
    // The test client sends `Host: test.local`.
    assert_eq!(seen[0].header("host"), Some("test.local"));
    assert_eq!(app.connections(), 1, "the app connection was not reused");
}

#[test]
fn an_https_upstream_is_verified_against_its_ca_and_pooled() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let app = App::start_tls(&cert, &key);
    let (gw, _rx) = through(
        &format!("https://127.0.0.1:{}", app.addr.port()),
        &format!("upstream_ca_file = {}\n", toml_path(&ca)),
    );
    three_requests_one_app_connection(&gw, &app);
}

#[test]
fn an_https_upstream_with_upstream_host_is_verified_by_that_name() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let app = App::start_tls(&cert, &key);
    // `ca_file` serves both the gateway (unused here: ws://) and the app
    // when `upstream_ca_file` is not set.
    let (gw, _rx) = through(
        &format!("https://127.0.0.1:{}", app.addr.port()),
        &format!(
            "ca_file = {}\nupstream_host = \"localhost\"\n",
            toml_path(&ca)
        ),
    );
    let r = client::request(gw.addr, "GET", "/alice/named", &[], b"");
    assert_eq!(r.status, 200, "{}", r.summary());
    let seen = app.requests();
    assert_eq!(seen[0].header("host"), Some("localhost"));
    assert_eq!(
        seen[0].header("x-forwarded-host"),
        Some("test.local"),
        "the client's Host travels on in X-Forwarded-Host"
    );
}

#[test]
fn an_https_upstream_signed_by_another_ca_gets_502_and_the_log_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = certificates(&dir.path().join("app"));
    let (other_ca, _, _) = certificates(&dir.path().join("other"));
    let app = App::start_tls(&cert, &key);
    let (gw, mut rx) = through(
        &format!("https://127.0.0.1:{}", app.addr.port()),
        &format!("upstream_ca_file = {}\n", toml_path(&other_ca)),
    );
    let r = client::request(gw.addr, "GET", "/alice/x", &[], b"");
    assert_eq!(r.status, 502, "{}", r.summary());
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        !body.contains("TLS") && !body.contains("127.0.0.1"),
        "{body}"
    );
    let line = rx
        .proc
        .wait_log(&["upstream call failed", "TLS with upstream"]);
    assert!(line.contains("invalid peer certificate"), "{line}");
    assert!(app.requests().is_empty(), "no request reached the app");
}

#[test]
fn a_unix_socket_upstream_is_served_and_pooled() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let app = App::start_unix(&sock);
    let (gw, _rx) = through(&format!("unix:{}", sock.display()), "");
    three_requests_one_app_connection(&gw, &app);
}

#[test]
fn a_unix_socket_that_is_gone_gets_502_and_the_log_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let (gw, mut rx) = through(&format!("unix:{}", sock.display()), "");
    let r = client::request(gw.addr, "GET", "/alice/x", &[], b"");
    assert_eq!(r.status, 502, "{}", r.summary());
    let line = rx.proc.wait_log(&["upstream call failed", "nobody.sock"]);
    assert!(line.contains("No such file"), "{line}");
}

#[test]
fn upstream_host_replaces_the_clients_host() {
    let app = App::start();
    let (gw, _rx) = through(
        &format!("http://{}", app.addr),
        "upstream_host = \"app.internal:8080\"\n",
    );
    let r = client::request(
        gw.addr,
        "GET",
        "/alice/h",
        &[("Host", "public.example")],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.summary());
    let seen = app.requests();
    assert_eq!(seen[0].headers_all("host"), ["app.internal:8080"]);
    assert_eq!(seen[0].header("x-forwarded-host"), Some("public.example"));
}

/// `max_response_head_size` and `max_response_headers` bound the app's
/// response heads: one within both is relayed, one past either gets the
/// client 502 and the receiver's log says which limit.
#[test]
fn response_heads_past_the_receivers_limits_get_502_and_the_log_says_why() {
    use common::scripted_app::ScriptedApp;
    let app = ScriptedApp::start(|x| {
        let head = match x.req.target.as_str() {
            // ~3 KiB of one field: past a 2 KiB limit.
            "/alice/big" => format!("X-Big: {}\r\n", "a".repeat(3000)),
            // 12 small fields: past a limit of 10.
            "/alice/many" => (0..12).map(|i| format!("X-F{i}: {i}\r\n")).collect(),
            _ => "X-Small: 1\r\n".to_owned(),
        };
        x.write(format!("HTTP/1.1 200 OK\r\n{head}Content-Length: 2\r\n\r\nok").as_bytes());
    });
    let gw = Gateway::start(&GatewayConfig::default());
    let mut cfg = ReceiverConfig::new(gw.addr, app.addr, ALICE_TOKEN, 1);
    cfg.extra_toml = "max_response_head_size = 2048\nmax_response_headers = 10\n".into();
    let mut rx = Receiver::start_with(&cfg);
    rx.wait_connected(1);

    let r = client::request(gw.addr, "GET", "/alice/small", &[], b"");
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "ok"),
        "{}",
        r.summary()
    );
    assert_eq!(r.header("x-small"), Some("1"));

    let r = client::request(gw.addr, "GET", "/alice/big", &[], b"");
    assert_eq!(r.status, 502, "{}", r.summary());
    let line = rx.proc.wait_log(&["upstream call failed", "/alice/big"]);
    assert!(line.contains("too large"), "{line}");

    let r = client::request(gw.addr, "GET", "/alice/many", &[], b"");
    assert_eq!(r.status, 502, "{}", r.summary());
    let line = rx.proc.wait_log(&["upstream call failed", "/alice/many"]);
    assert!(line.contains("too many"), "{line}");
}
