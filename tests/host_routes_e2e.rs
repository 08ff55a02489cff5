//! Host routes (issue #16): one gateway serving several domains. A route
//! may name a host (`alice.example/agents`) or every subdomain of one
//! (`*.bob.example`); the request's `Host` picks, its port and case
//! ignored; path-only routes still serve any host. Two identities, each
//! with its own receiver and app, so which app answered shows who owned
//! the request.

mod common;

use common::procs::Token;
use common::{client, App, Gateway, GatewayConfig, Receiver, ALICE_TOKEN, BOB_TOKEN};

#[test]
fn the_host_picks_the_route_and_path_routes_serve_any_host() {
    let cfg = GatewayConfig {
        tokens: vec![
            Token {
                name: "alice".into(),
                token: ALICE_TOKEN.into(),
                paths: vec!["Alice.Example/agents".into(), "/shared".into()],
            },
            Token {
                name: "bob".into(),
                token: BOB_TOKEN.into(),
                paths: vec!["*.bob.example".into()],
            },
        ],
        ..GatewayConfig::default()
    };
    let gw = Gateway::start(&cfg);
    let alice_app = App::saying(|_| b"alice".to_vec());
    let bob_app = App::saying(|_| b"bob".to_vec());
    let mut alice = Receiver::start(gw.addr, alice_app.addr, ALICE_TOKEN, 1);
    let mut bob = Receiver::start(gw.addr, bob_app.addr, BOB_TOKEN, 1);
    alice.wait_connected(1);
    bob.wait_connected(1);

    let answer = |host: &str, path: &str| {
        let r = client::request(gw.addr, "GET", path, &[("Host", host)], b"");
        match r.status {
            200 => String::from_utf8(r.body).unwrap(),
            s => s.to_string(),
        }
    };
    for (host, path, who) in [
        ("alice.example", "/agents/x", "alice"),
        ("ALICE.EXAMPLE:8080", "/agents", "alice"),
        ("alice.example.", "/agents/q?x=1", "alice"),
        ("alice.example", "/other", "404"),
        ("other.example", "/agents/x", "404"),
        ("a.bob.example", "/anything", "bob"),
        ("deep.a.bob.example:443", "/", "bob"),
        ("bob.example", "/x", "404"),
        ("other.example", "/shared/x", "alice"),
        ("a.bob.example", "/shared/x", "bob"),
    ] {
        assert_eq!(answer(host, path), who, "Host: {host}, {path}");
    }
    // What each app saw: the client's Host, unchanged.
    let seen = bob_app.requests();
    assert_eq!(seen[0].header("host"), Some("a.bob.example"));
}

#[test]
fn a_route_that_is_neither_path_nor_host_fails_check_and_the_start() {
    let mut cfg = GatewayConfig::default();
    cfg.tokens[0].paths = vec!["agents/alice".into()];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let out = common::procs::run(["check", "gateway", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gateway.auth.tokens.paths") && err.contains("`agents/alice` is neither"),
        "{err}"
    ); // The start refuses it with the same words.
    let f = common::procs::run_to_end("gateway", &[], &path);
    assert!(!f.status.success(), "{}", f.stderr);
    assert!(
        f.stderr.contains("`agents/alice` is neither"),
        "{}",
        f.stderr
    );
}
