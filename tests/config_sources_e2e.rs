//! Where configuration comes from (issue #16, "a one-line start"): every
//! key by flag (`--set table.key=value`, and `--gateway-url`, `--token`,
//! `--upstream` for a receiver) and by environment
//! (`ANP_PROXY_<TABLE>__<KEY>`), flag > env > file > default, and a
//! receiver that runs with no config file at all.
//!
//! The real binaries; every process runs in a fresh temporary directory
//! (so no `config.toml` is found unless a test writes one), ports are 0,
//! and waits are on the lines the processes print.

mod common;

use std::path::Path;

use common::procs::{binary, Proc};
use common::{client, App, Gateway, GatewayConfig, ALICE_TOKEN};

/// A receiver process (no config file) with `args` and `env`, waited on
/// until its first tunnel is connected.
fn receiver_connected(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut args = args.to_vec();
    args.insert(0, "receiver");
    let mut rx = Proc::start("receiver", binary(), &args, &env);
    rx.wait_line("`anp-proxy receiver tunnel … connected to …`", |l| {
        l.starts_with("anp-proxy receiver tunnel") && l.contains(" connected to ")
    });
    rx
}

/// GET `path` through the gateway: (status, body).
fn get(gw: &Gateway, path: &str) -> (u16, String) {
    let r = client::request(gw.addr, "GET", path, &[], b"");
    (r.status, r.body_text())
}

fn one_worker() -> GatewayConfig {
    GatewayConfig {
        workers: 1,
        ..GatewayConfig::default()
    }
}

#[test]
fn a_receiver_runs_with_no_config_file_from_flags_alone() {
    let app = App::start();
    let gw = Gateway::start(&one_worker());
    let url = gw.ws_url();
    let upstream = format!("http://{}", app.addr);
    let mut rx = receiver_connected(
        &[
            "--gateway-url",
            &url,
            "--token",
            ALICE_TOKEN,
            "--upstream",
            &upstream,
        ],
        &[],
    );
    rx.wait_log(&["no config file"]);
    let (status, body) = get(&gw, "/alice/from-flags");
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.requests_to("/alice/from-flags").len(), 1);
}

#[test]
fn a_receiver_runs_with_no_config_file_from_the_environment_alone() {
    let app = App::start();
    let gw = Gateway::start(&one_worker());
    let url = gw.ws_url();
    let upstream = format!("http://{}", app.addr);
    let _rx = receiver_connected(
        &[],
        &[
            ("ANP_PROXY_RECEIVER__GATEWAY_URL", &url),
            ("ANP_PROXY_RECEIVER__TOKEN", ALICE_TOKEN),
            ("ANP_PROXY_RECEIVER__UPSTREAM", &upstream),
            ("ANP_PROXY_RECEIVER__TUNNELS", "1"),
        ],
    );
    let (status, body) = get(&gw, "/alice/from-env");
    assert_eq!(status, 200, "{body}");
}

/// A file with the wrong token and upstream: the environment's values win
/// over it, and a flag wins over the environment.
#[test]
fn flags_beat_the_environment_which_beats_the_file() {
    let app = App::start();
    let gw = Gateway::start(&one_worker());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rx.toml");
    std::fs::write(
        &config,
        format!(
            "[receiver]\ngateway_url = \"{}\"\ntoken = \"wrong-token-from-the-file\"\n\
             upstream = \"http://127.0.0.1:9\"\ntunnels = 1\n",
            gw.ws_url()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let upstream = format!("http://{}", app.addr);
    let _rx = receiver_connected(
        &["--config", config, "--upstream", &upstream],
        &[
            ("ANP_PROXY_RECEIVER__TOKEN", ALICE_TOKEN),
            ("ANP_PROXY_RECEIVER__UPSTREAM", "http://127.0.0.1:9"),
        ],
    );
    let (status, body) = get(&gw, "/alice/precedence");
    assert_eq!(status, 200, "{body}");

    // `check --print` says where each value came from, secrets masked.
    let out = std::process::Command::new(binary())
        .args(["check", "receiver", "--print", "--config", config])
        .args(["--set", "receiver.max_concurrent=7"])
        .env("ANP_PROXY_RECEIVER__TOKEN", ALICE_TOKEN)
        .env("ANP_PROXY_RECEIVER__MAX_CONCURRENT", "5")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!printed.contains(ALICE_TOKEN), "{printed}");
    for line in [
        "token = \"<redacted>\"  # env ANP_PROXY_RECEIVER__TOKEN",
        "max_concurrent = 7  # flag --set receiver.max_concurrent",
        "tunnels = 1  # file",
        "chunk_size = 65536\n",
    ] {
        assert!(printed.contains(line), "expected {line:?} in:\n{printed}");
    }
}

/// What a start with `env` (and no file) prints before it exits: it must
/// exit, with 2, naming each of `needles`.
fn refused(args: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
    for n in needles {
        assert!(
            stderr.contains(n),
            "{args:?} {env:?}: expected {n:?} in {stderr}"
        );
    }
    assert_eq!(stderr.lines().count(), 1, "said once: {stderr}");
}

#[test]
fn a_bad_value_from_the_environment_or_a_flag_is_refused_naming_it() {
    refused(
        &["gateway"],
        &[("ANP_PROXY_GATEWAY__PORT", "eighty")],
        &[
            "environment variable ANP_PROXY_GATEWAY__PORT",
            "`gateway.port`",
        ],
    );
    refused(
        &["receiver"],
        &[("ANP_PROXY_RECEIVER__MAX_CONCURRENT", "0")],
        &[
            "ANP_PROXY_RECEIVER__MAX_CONCURRENT",
            "receiver.max_concurrent",
            "> 0",
        ],
    );
    refused(
        &["gateway"],
        &[("ANP_PROXY_GATEWAY__PROT", "1")],
        &["ANP_PROXY_GATEWAY__PROT", "did you mean `port`?"],
    );
    refused(
        &["receiver"],
        &[("ANP_PROXY_RECEIVER_TOKEN", "x")],
        &["ANP_PROXY_RECEIVER_TOKEN", "ANP_PROXY_RECEIVER__TOKEN"],
    );
    refused(
        &["gateway", "--port", "70000"],
        &[],
        &["flag --port", "`gateway.port`"],
    );
    refused(
        &["check", "--set", "gateway.timeout=-1"],
        &[],
        &["flag --set gateway.timeout", "negative"],
    );
    // The URL checks a start makes name the key too.
    refused(
        &["check", "receiver"],
        &[("ANP_PROXY_RECEIVER__GATEWAY_URL", "http://gw.example/ws")],
        &["receiver.gateway_url"],
    );
}

/// An explicit `--config` that is not there is still an error (only the
/// default ./config.toml is optional).
#[test]
fn an_explicit_config_file_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let out = std::process::Command::new(binary())
        .args(["check", "--config"])
        .arg(&missing)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope.toml"), "{stderr}");
    // Without --config and without ./config.toml: the defaults.
    let out = std::process::Command::new(binary())
        .arg("check")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("(no config file): ok"));
    assert!(
        !Path::new(&dir.path().join("data")).exists(),
        "check writes nothing"
    );
}
