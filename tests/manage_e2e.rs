//! `./manage.sh` against a temporary run directory (issue #16, item 7,
//! and "restart receiver"):
//!
//! - `start` with a configuration `check` refuses launches nothing: exit
//!   2, the reason on stderr, no pid file, and no lines of an earlier
//!   run's log repeated;
//! - `restart receiver` starts the new receiver first and then drains the
//!   old one: a client loop through the gateway sees no failure, and the
//!   old process is gone afterwards; a SIGHUP leaves the receiver serving
//!   (it says it did not reload), and `reload receiver` replaces it as
//!   `restart` does.
//!
//! The real binary and script; ports 0; the loop's progress is waited on
//! with `wait_until`, never slept on.

mod common;

use std::time::Duration;

use common::load::Load;
use common::managed::Managed;
use common::{client, wait_until, App, Gateway, GatewayConfig, ALICE_TOKEN};

const WAIT: Duration = Duration::from_secs(60);

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[test]
fn start_with_a_config_check_refuses_launches_nothing() {
    // A receiver whose gateway_url is not ws(s)://: `check` refuses it.
    let m = Managed::with_role(
        "receiver",
        "[receiver]\ngateway_url = \"http://127.0.0.1:9/ws\"\ntoken = \"t-12345678\"\n",
    );
    // An earlier run's log: none of it may be shown again.
    std::fs::create_dir_all(m.run_dir()).unwrap();
    std::fs::write(m.log_path(), "OLD LINE from an earlier run\n").unwrap();
    let out = m.try_run(&["start", "receiver"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("receiver.gateway_url"), "{stderr}");
    assert!(stderr.contains("not started"), "{stderr}");
    assert!(!stderr.contains("OLD LINE") && !stdout.contains("OLD LINE"));
    assert!(!m.pid_path().exists(), "a pid file was written");
    assert_eq!(
        std::fs::read_to_string(m.log_path()).unwrap(),
        "OLD LINE from an earlier run\n",
        "the log was touched: something was launched"
    );
    // An unknown key too, named with its "did you mean".
    let m = Managed::with_role("gateway", "[gateway]\nprot = 1\n");
    let out = m.try_run(&["start", "gateway"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did you mean `port`?"), "{stderr}");
    assert!(!m.pid_path().exists());
}

#[test]
fn restart_sighup_and_reload_leave_a_receiver_serving_without_a_failed_request() {
    let app = App::start();
    // No grace for a missing tunnel: a gap between the old receiver and
    // the new one would be a 503 at once, not hidden by a wait.
    let gw = Gateway::start(&GatewayConfig {
        workers: 1,
        extra_gateway_toml: "no_tunnel_wait = 0\n".into(),
        ..GatewayConfig::default()
    });
    let m = Managed::with_role(
        "receiver",
        &format!(
            "[receiver]\ngateway_url = \"{}\"\ntoken = \"{ALICE_TOKEN}\"\nupstream = \"http://{}\"\n\
             tunnels = 1\nshutdown_grace = 10\n",
            gw.ws_url(),
            app.addr
        ),
    );
    m.run(&["start", "receiver"]);
    let old = m.pid();
    assert_ne!(old, 0);
    let addr = gw.addr;
    // Clients asking the gateway for `/alice/…` in a loop.
    let load = Load::start(4, move |c, i| {
        let r = client::request(addr, "GET", &format!("/alice/{c}/{i}"), &[], b"");
        (r.status == 200).then_some(()).ok_or_else(|| r.summary())
    });
    load.wait_more(50, "requests through the first receiver", WAIT);
    let out = m.run(&["restart", "receiver"]);
    let new = m.pid();
    assert_ne!(new, old, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        gone(old),
        "restart returned with the old receiver ({old}) running"
    );
    load.wait_more(50, "requests through the new receiver", WAIT);

    // SIGHUP (`kill -HUP`, a closed terminal) would end a process that
    // does not handle it: the receiver keeps serving and says how it
    // takes a new configuration.
    common::sys::signal(new, libc::SIGHUP);
    wait_until("the receiver's answer to SIGHUP", WAIT, || {
        m.log()
            .contains("anp-proxy reload failed: a receiver applies a new configuration")
    });
    load.wait_more(50, "requests through the receiver after SIGHUP", WAIT);
    assert!(!gone(new), "SIGHUP ended the receiver");
    assert_eq!(m.pid(), new);

    // `reload receiver` is that replacement, without a gap.
    let out = m.run(&["reload", "receiver"]);
    let newest = m.pid();
    assert_ne!(newest, new, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(gone(new), "reload returned with the old receiver running");
    load.wait_more(50, "requests through the reloaded receiver", WAIT);

    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "manage.sh restart receiver, SIGHUP, reload receiver: {ok} ok, {} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    m.run(&["stop", "receiver"]);
    assert!(gone(newest));
}
