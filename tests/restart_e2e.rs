//! Restarts and takeovers of the real gateway binary (docs/OPERATIONS.md,
//! "Signals: drain, takeover, reload"):
//!
//! - `./manage.sh restart` on the shipped `config.toml` (only `port` and
//!   `admin_port` changed, to fixed free ports, as shipped): a client loop
//!   on `/health` sees no failure, and afterwards the admin port is served
//!   by the new process;
//! - a second gateway started by mistake on a port another one listens on
//!   is refused (non-zero exit, the holder's pid named), for the public and
//!   the admin port;
//! - `--takeover` joins on purpose, and once the old gateway starts
//!   draining the admin port is the successor's alone.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

use common::load::Load;
use common::managed::Managed;
use common::procs::Proc;
use common::wait_until;
use common::{client, App, Gateway, GatewayConfig, Receiver, ALICE_TOKEN};

const WAIT: Duration = Duration::from_secs(60);

/// Two distinct ports nobody listens on right now.
fn two_free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// `text` with the one line equal to `from` replaced by `to`.
fn replace_line(text: &str, from: &str, to: &str) -> String {
    let n = text.lines().filter(|l| *l == from).count();
    assert_eq!(n, 1, "expected exactly one line `{from}` in config.toml");
    text.lines()
        .map(|l| if l == from { to } else { l })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// `GET /health` on a fresh connection; the status code.
fn health(addr: SocketAddr) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(WAIT))?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.as_bytes().to_vec())
        .unwrap_or_default();
    Ok((status, body))
}

/// The pid the admin port's `/health` reports.
fn admin_pid(admin: SocketAddr) -> u64 {
    let r = client::request(admin, "GET", "/health", &[], b"");
    assert_eq!(r.status, 200, "admin GET /health: {}", r.summary());
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("admin GET /health: expected JSON: {e}: {}", r.summary()));
    v["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("admin GET /health: no pid in {v}"))
}

#[test]
fn manage_sh_restart_on_the_shipped_config_drops_nothing() {
    let (port, admin_port) = two_free_ports();
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap();
    let config = replace_line(&shipped, "port = 8089", &format!("port = {port}"));
    let config = replace_line(
        &config,
        "admin_port = 8090",
        &format!("admin_port = {admin_port}"),
    );
    let m = Managed::new(&config);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();

    m.run(&["start"]);
    let old = m.pid();
    assert_eq!(
        admin_pid(admin),
        old as u64,
        "before: admin served by {old}"
    );

    // Clients on fresh connections, one request each, until stopped.
    let load = Load::start(4, move |_, _| match health(addr) {
        Ok((200, body)) if body == b"ok\n" => Ok(()),
        Ok((s, body)) => Err(format!(
            "status {s}, body {:?}",
            String::from_utf8_lossy(&body)
        )),
        Err(e) => Err(e.to_string()),
    });
    load.wait_more(50, "requests to flow before the restart", WAIT);
    let out = m.run(&["restart"]);
    let new = m.pid();
    assert_ne!(new, old, "a new process after the restart");
    assert!(
        gone(old),
        "manage.sh restart returned with the old gateway ({old}) still running"
    );
    load.wait_more(50, "requests served by the successor", WAIT);
    let (ok, failures) = load.finish();
    eprintln!(
        "manage.sh restart ({}): {ok} requests ok, {} failed",
        String::from_utf8_lossy(&out.stdout).trim(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "no request may fail across the restart: {:?}",
        &failures[..failures.len().min(10)]
    );
    // Only the new process listens on the admin port now.
    for _ in 0..5 {
        assert_eq!(admin_pid(admin), new as u64, "after: admin served by {new}");
    }
    m.run(&["stop"]);
    assert!(gone(new), "manage.sh stop returned with {new} running");
}

/// Starts `anp-proxy gateway` with `cfg` and expects it to refuse: its exit
/// status must be a failure; returns its log lines.
fn expect_refused(cfg: &GatewayConfig) -> Vec<String> {
    let mut p = Proc::spawn("second", "gateway", cfg.flags(), &cfg.to_toml());
    let status = match p.wait_line_or_exit("the ready line, or an exit", |l| {
        l.contains("gateway listening on")
    }) {
        Ok(line) => panic!("a second gateway on a held port must not start: it printed {line:?}"),
        Err(status) => status,
    };
    assert!(!status.success(), "expected a failing exit, got {status}");
    // stdout closed with the exit; its log (stderr) follows.
    wait_until("the refusal in the log", WAIT, || {
        p.stderr_lines(0).iter().any(|l| l.contains("--takeover"))
    });
    p.stderr_lines(0)
}

fn assert_names(lines: &[String], key: &str, pid: u32) {
    let line = lines
        .iter()
        .find(|l| l.contains("--takeover"))
        .unwrap_or_else(|| panic!("no refusal in {lines:?}"));
    for want in [
        key.to_string(),
        format!("pid {pid}"),
        "./manage.sh restart".to_string(),
    ] {
        assert!(line.contains(&want), "expected {want:?} in {line:?}");
    }
}

#[test]
fn an_accidental_second_gateway_on_a_held_port_is_refused() {
    let a = Gateway::start(&GatewayConfig::default());
    let lines = expect_refused(&GatewayConfig {
        port: a.addr.port(),
        ..GatewayConfig::default()
    });
    assert_names(&lines, "gateway.port", a.proc.pid());
    // The first one serves on, alone.
    assert_eq!(health(a.addr).unwrap().0, 200);
}

#[test]
fn a_second_gateway_on_a_held_admin_port_is_refused() {
    let (a, admin) = Gateway::start_with_admin(&GatewayConfig::default());
    let mut cfg = GatewayConfig::default(); // its own public port
    cfg.extra_gateway_toml += &format!("admin_port = {}\n", admin.port());
    let lines = expect_refused(&cfg);
    assert_names(&lines, "gateway.admin_port", a.proc.pid());
    assert_eq!(admin_pid(admin), a.proc.pid() as u64);
}

#[test]
fn takeover_joins_and_the_admin_port_follows_the_successor_when_the_old_one_drains() {
    let app = App::start();
    let mut cfg = GatewayConfig::default();
    cfg.extra_gateway_toml += "shutdown_grace = 60\n";
    let (mut a, admin) = Gateway::start_with_admin(&cfg);
    let mut rx = Receiver::start(a.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    // A request in flight on A keeps it draining for as long as we need.
    let addr = a.addr;
    let held = thread::spawn(move || {
        client::request(addr, "GET", "/alice/held", &[("X-Test-Hold", "held")], b"")
    });
    app.wait_arrived("held");

    let mut successor = cfg.clone();
    successor.port = a.addr.port();
    successor.takeover = true;
    successor.extra_gateway_toml += &format!("admin_port = {}\n", admin.port());
    let b = Gateway::start(&successor);
    assert_eq!(b.addr, a.addr, "the successor joins the same port");
    assert!(a.proc.exited().is_none(), "the first gateway still runs");

    a.signal(libc::SIGTERM);
    wait_until("the old gateway to close its admin listener", WAIT, || {
        a.proc
            .stderr_lines(0)
            .iter()
            .any(|l| l.contains("admin listener closed (draining)"))
    });
    // A is still draining (its request is held), yet admin is B's alone.
    assert!(
        a.proc.exited().is_none(),
        "the old gateway exited too early"
    );
    for _ in 0..10 {
        assert_eq!(admin_pid(admin), b.proc.pid() as u64);
    }
    app.release("held");
    let r = held.join().unwrap();
    assert_eq!(r.status, 200, "the held request: {}", r.summary());
    let status = a.proc.wait_exit(WAIT);
    assert!(status.success(), "drain exits 0, got {status}");
    assert_eq!(health(b.addr).unwrap().0, 200);
}
