//! Observability end to end (issue #6): the admin `/metrics` and `/stats`
//! count requests by route and status class, latency and bytes; refused
//! tunnel upgrades are counted by reason; the access log has one JSON line
//! per request (gateway-made replies included), none when it is off, and it
//! rotates by size with a capped number of backups.
//!
//! Real gateway and receiver binaries on 127.0.0.1:0. Counters are read by
//! polling the admin listener until they reach the expected total (a
//! core records a request right after writing its response, so a client
//! can be a hair ahead), then compared exactly.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::client::{request, send_raw};
use common::{wait_until, App, Gateway, GatewayConfig, Receiver, ALICE_TOKEN, BOB_TOKEN};

/// Hang guard for conditions polled below.
const WAIT: Duration = Duration::from_secs(30);

/// Prometheus text → `name{labels}` → value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad metrics line {l:?}"));
            let v: f64 = v
                .parse()
                .unwrap_or_else(|e| panic!("bad value in {l:?}: {e}"));
            (k.to_string(), v)
        })
        .collect()
}

fn metrics(admin: SocketAddr) -> BTreeMap<String, f64> {
    let r = request(admin, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200, "admin /metrics: {}", r.summary());
    parse_metrics(&r.body_text())
}

fn stats(admin: SocketAddr) -> serde_json::Value {
    let r = request(admin, "GET", "/stats", &[], b"");
    assert_eq!(r.status, 200, "admin /stats: {}", r.summary());
    serde_json::from_str(&r.body_text())
        .unwrap_or_else(|e| panic!("admin /stats is not JSON ({e}): {}", r.body_text()))
}

/// Polls /metrics until `name` reaches `want`; returns that scrape.
fn metrics_when(admin: SocketAddr, name: &str, want: f64) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    wait_until(&format!("/metrics {name} >= {want}"), WAIT, || {
        m = metrics(admin);
        m.get(name).copied().unwrap_or(0.0) >= want
    });
    m
}

/// Every line of the access log files in `dir` (`access.log.YYYY-MM-DD`
/// with daily rotation), once there are at least `n` whole lines.
fn access_lines(dir: &Path, n: usize) -> Vec<serde_json::Value> {
    let mut text = String::new();
    wait_until(&format!("{n} access log lines"), WAIT, || {
        text.clear();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("access.log") {
                text += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
        }
        let complete = text.ends_with('\n') || text.is_empty();
        text.lines().count() >= n && complete
    });
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("access log line is not JSON ({e}): {l:?}"))
        })
        .collect()
}

/// An address where nothing listens (bound, then closed).
fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn logging(extra: &str) -> String {
    format!("level = \"info\"\nlog_dir = \"logs\"\n{extra}")
}

fn log_dir(gw: &Gateway) -> PathBuf {
    gw.proc.dir.path().join("logs")
}

/// One request the test sends and what it expects back and in the log.
struct Case {
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
    status: u16,
    route: Option<&'static str>,
    identity: Option<&'static str>,
    /// Went through a tunnel: has a request_id.
    tunnelled: bool,
}

fn case(method: &'static str, path: &'static str, status: u16) -> Case {
    let (route, identity) = if path.starts_with("/alice") {
        (Some("/alice"), Some("alice"))
    } else if path.starts_with("/bob") {
        (Some("/bob"), Some("bob"))
    } else {
        (None, None)
    };
    Case {
        method,
        path,
        headers: vec![],
        body: vec![],
        status,
        route,
        identity,
        tunnelled: route.is_some(),
    }
}

#[test]
fn metrics_and_access_log_count_every_request_by_route_and_class() {
    let app = App::start();
    let cfg = GatewayConfig {
        logging_toml: logging(""),
        ..GatewayConfig::default()
    };
    let (gw, admin) = Gateway::start_with_admin(&cfg);
    // One tunnel per core for each identity: every request finds a local
    // tunnel. bob's app is down: its requests end in 502.
    let mut alice = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 2);
    let mut bob = Receiver::start(gw.addr, dead_addr(), BOB_TOKEN, 2);
    alice.wait_connected(2);
    bob.wait_connected(2);

    let mut cases = vec![
        Case {
            body: vec![b'a'; 1000],
            ..case("POST", "/alice/ok/1", 200)
        },
        Case {
            body: vec![b'b'; 20_000],
            ..case("POST", "/alice/ok/2", 200)
        },
        Case {
            headers: vec![("X-Test-Body-Len", "5000")],
            ..case("GET", "/alice/ok/3", 200)
        },
        Case {
            headers: vec![("X-Test-Status", "404")],
            ..case("GET", "/alice/missing/1", 404)
        },
        Case {
            headers: vec![("X-Test-Status", "429")],
            ..case("GET", "/alice/missing/2", 429)
        },
        Case {
            headers: vec![("X-Test-Status", "500")],
            ..case("GET", "/alice/broken", 500)
        },
        case("GET", "/bob/down/1", 502),
        Case {
            body: vec![b'c'; 300],
            ..case("PUT", "/bob/down/2", 502)
        },
        case("GET", "/nowhere/1", 404),
        case("DELETE", "/nowhere/2", 404),
    ];
    // The /alice/ok/3 response has 5000 bytes, the POSTs echo their bodies.
    let mut body_out = 0usize;
    let mut body_in = 0usize;
    for c in &mut cases {
        let r = request(gw.addr, c.method, c.path, &c.headers, &c.body);
        assert_eq!(
            r.status,
            c.status,
            "{} {}: {}",
            c.method,
            c.path,
            r.summary()
        );
        body_out += r.body.len();
        body_in += c.body.len();
    }
    // A head the gateway refuses before parsing it (bare LF): 400.
    let bad = send_raw(gw.addr, b"GET /alice/x HTTP/1.1\nHost: a\n\n");
    assert_eq!(bad.status, 400, "bare LF head: {}", bad.summary());
    let total = cases.len() + 1;

    let m = metrics_when(admin, "anp_request_duration_seconds_count", total as f64);
    let by_route: BTreeMap<&str, f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with("anp_requests_total{"))
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    let want: BTreeMap<&str, f64> = [
        ("anp_requests_total{route=\"/alice\",class=\"2xx\"}", 3.0),
        ("anp_requests_total{route=\"/alice\",class=\"4xx\"}", 2.0),
        ("anp_requests_total{route=\"/alice\",class=\"5xx\"}", 1.0),
        ("anp_requests_total{route=\"/bob\",class=\"5xx\"}", 2.0),
        ("anp_requests_total{route=\"\",class=\"4xx\"}", 3.0),
    ]
    .into_iter()
    .collect();
    assert_eq!(by_route, want, "requests by route and class");
    assert_eq!(m["anp_request_duration_seconds_count"], total as f64);
    assert_eq!(
        m["anp_request_duration_seconds_bucket{le=\"+Inf\"}"],
        total as f64
    );
    // Buckets are cumulative.
    let buckets: Vec<f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with("anp_request_duration_seconds_bucket{"))
        .map(|(_, v)| *v)
        .collect();
    assert!(buckets.len() >= 2);
    assert!(m["anp_request_duration_seconds_sum"] > 0.0);
    assert!(
        m["anp_bytes_in_total"] >= body_in as f64,
        "bytes in {} < request bodies {body_in}",
        m["anp_bytes_in_total"]
    );
    assert!(
        m["anp_bytes_out_total"] >= body_out as f64,
        "bytes out {} < response bodies {body_out}",
        m["anp_bytes_out_total"]
    );
    assert_eq!(m["anp_requests_in_flight"], 0.0);
    assert_eq!(m["anp_metrics_cores"], 2.0, "both cores answered");

    let s = stats(admin);
    assert_eq!(s["requests_total"], total as u64, "/stats: {s}");
    assert_eq!(s["in_flight"], 0, "/stats: {s}");
    assert_eq!(s["requests_by_route"]["/bob"]["5xx"], 2, "/stats: {s}");
    for q in ["p50", "p90", "p99"] {
        assert!(
            s["latency_ms"][q].as_f64().is_some_and(|v| v > 0.0),
            "/stats latency_ms.{q}: {s}"
        );
    }

    // The access log: one line per request, gateway-made ones included.
    let lines = access_lines(&log_dir(&gw), total);
    assert_eq!(
        lines.len(),
        total,
        "one access line per request: {lines:#?}"
    );
    let mut ids = std::collections::HashSet::new();
    for c in &cases {
        let l = lines
            .iter()
            .find(|l| l["path"] == c.path)
            .unwrap_or_else(|| panic!("no access line for {}: {lines:#?}", c.path));
        assert_eq!(l["method"], c.method, "{l}");
        assert_eq!(l["status"], c.status, "{l}");
        assert_eq!(l["route"], serde_json::json!(c.route), "{l}");
        assert_eq!(l["identity"], serde_json::json!(c.identity), "{l}");
        if c.tunnelled {
            let id = l["request_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no request_id: {l}"));
            assert!(
                id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                "{l}"
            );
            assert!(ids.insert(id.to_string()), "request_id repeated: {l}");
        } else {
            assert!(l["request_id"].is_null(), "{l}");
        }
        assert!(l["bytes_in"].as_u64().unwrap() > c.body.len() as u64, "{l}");
        assert!(l["bytes_out"].as_u64().unwrap() > 0, "{l}");
        let client: SocketAddr = l["client"].as_str().unwrap().parse().unwrap();
        assert_eq!(client.ip(), gw.addr.ip(), "{l}");
        let t = l["time"].as_str().unwrap();
        assert!(
            t.len() == 24 && t.ends_with('Z') && &t[10..11] == "T",
            "time {t:?}"
        );
        assert!(l["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{l}");
    }
    let echoed = lines.iter().find(|l| l["path"] == "/alice/ok/2").unwrap();
    assert!(echoed["bytes_in"].as_u64().unwrap() >= 20_000, "{echoed}");
    assert!(echoed["bytes_out"].as_u64().unwrap() >= 20_000, "{echoed}");
    let refused = lines
        .iter()
        .find(|l| l["status"] == 400)
        .unwrap_or_else(|| panic!("no access line for the 400: {lines:#?}"));
    assert!(
        refused["method"].is_null() && refused["path"].is_null(),
        "{refused}"
    );
}

/// Writes a tunnel upgrade by hand and returns the status line.
fn upgrade(addr: SocketAddr, extra: &str, with_key: bool) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let key = if with_key {
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    } else {
        ""
    };
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    text.lines().next().unwrap_or("").to_string()
}

#[test]
fn refused_tunnel_upgrades_are_counted_by_reason_and_not_as_requests() {
    let cfg = GatewayConfig {
        logging_toml: logging(""),
        ..GatewayConfig::default()
    };
    let (gw, admin) = Gateway::start_with_admin(&cfg);
    let l = upgrade(gw.addr, "", true);
    assert!(l.contains(" 401 "), "no Authorization: {l}");
    for _ in 0..2 {
        let l = upgrade(gw.addr, "Authorization: Bearer not-a-real-token\r\n", true);
        assert!(l.contains(" 401 "), "wrong token: {l}");
    }
    let l = upgrade(gw.addr, "Authorization: Bearer alice-secret\r\n", false);
    assert!(l.contains(" 400 "), "no Sec-WebSocket-Key: {l}");

    let m = metrics(admin);
    let auth: BTreeMap<&str, f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with("anp_auth_failures_total{"))
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    let want: BTreeMap<&str, f64> = [
        ("anp_auth_failures_total{reason=\"bad_handshake\"}", 1.0),
        (
            "anp_auth_failures_total{reason=\"missing_authorization\"}",
            1.0,
        ),
        ("anp_auth_failures_total{reason=\"unknown_token\"}", 2.0),
    ]
    .into_iter()
    .collect();
    assert_eq!(auth, want, "auth failures by reason");
    assert_eq!(stats(admin)["auth_failures"]["unknown_token"], 2);
    // Upgrades are not HTTP requests: no request counted, no access line.
    assert_eq!(m["anp_request_duration_seconds_count"], 0.0);
    assert!(
        !m.keys().any(|k| k.starts_with("anp_requests_total{")),
        "{m:#?}"
    );

    // A receiver with a wrong token is refused the same way, repeatedly.
    let app = App::start();
    let _rx = Receiver::start(gw.addr, app.addr, "wrong-token-123", 1);
    let m = metrics_when(
        admin,
        "anp_auth_failures_total{reason=\"unknown_token\"}",
        3.0,
    );
    assert!(m["anp_auth_failures_total{reason=\"unknown_token\"}"] >= 3.0);
    // A 404 afterwards proves the access log works, and the upgrades
    // before it left no line.
    assert_eq!(request(gw.addr, "GET", "/nowhere", &[], b"").status, 404);
    let lines = access_lines(&log_dir(&gw), 1);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["path"], "/nowhere");
}

#[test]
fn access_log_off_writes_no_line() {
    let cfg = GatewayConfig {
        logging_toml: logging("access_log = false\n"),
        ..GatewayConfig::default()
    };
    let (gw, admin) = Gateway::start_with_admin(&cfg);
    for i in 0..5 {
        let r = request(gw.addr, "GET", &format!("/nowhere/{i}"), &[], b"");
        assert_eq!(r.status, 404);
    }
    // The requests were served and recorded (metrics still count them).
    let m = metrics_when(admin, "anp_request_duration_seconds_count", 5.0);
    assert_eq!(m["anp_requests_total{route=\"\",class=\"4xx\"}"], 5.0);
    // The main log is in log_dir (so the directory is the right one) ...
    let dir = log_dir(&gw);
    wait_until(&format!("a main log in {}", dir.display()), WAIT, || {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("anp-proxy.log"))
            })
            .unwrap_or(false)
    });
    // ... and no access log was ever opened there.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("access.log")),
        "access_log = false but {names:?}"
    );
}

#[test]
fn access_and_main_logs_rotate_by_size_with_capped_backups() {
    let cfg = GatewayConfig {
        logging_toml: logging("rotation = \"size\"\nmax_size = 4096\nbackup_count = 2\n"),
        ..GatewayConfig::default()
    };
    let (gw, _admin) = Gateway::start_with_admin(&cfg);
    let dir = log_dir(&gw);
    let names = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    // 404s log a line in both files. Keep sending until both have rotated
    // past their cap: the access log is handed over in batches (every
    // 100 ms), so this takes a few rounds.
    let mut sent = 0;
    let mut rounds_after = 0;
    wait_until("both logs to rotate past their cap", WAIT * 2, || {
        for _ in 0..20 {
            let path = format!("/nowhere/{sent:06}/padding-to-make-lines-longer");
            assert_eq!(request(gw.addr, "GET", &path, &[], b"").status, 404);
            sent += 1;
        }
        let n = names();
        let full =
            n.contains(&"access.log.2".to_string()) && n.contains(&"anp-proxy.log.2".to_string());
        if full {
            // A few more rotations, to see the cap hold.
            rounds_after += 1;
        }
        rounds_after > 10
    });
    // Each log: the live file and backup_count = 2 backups. Waited for,
    // not read once: the log threads may still be writing the last
    // requests' lines, and file-rotate shifts the backups up (`.2` to
    // `.3`, the live file to `.1`) before it opens the new live file and
    // removes the oldest, so a listing in that instant shows `.3` and no
    // live file. A cap that did not hold leaves `.3` for good.
    let expected = [
        "access.log",
        "access.log.1",
        "access.log.2",
        "anp-proxy.log",
        "anp-proxy.log.1",
        "anp-proxy.log.2",
    ];
    wait_until("the live file and 2 backups of each log", WAIT, || {
        names() == expected
    });
    let n = names();
    for name in &n {
        let len = std::fs::metadata(dir.join(name)).unwrap().len();
        // max_size plus at most one hand-off (a 32 KiB batch) over it.
        assert!(len <= 4096 + 40 * 1024, "{name} is {len} bytes");
    }
    // Backups hold whole JSON lines.
    let text = std::fs::read_to_string(dir.join("access.log.1")).unwrap();
    for l in text.lines() {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("split or bad line in a backup ({e}): {l:?}"));
    }
}

/// A keep-alive client that paces its requests further apart than the
/// gateway's 5 ms hot read has that read cut once; after that it is
/// waited for without one (`conn.rs::Rhythm`), not cut again at every
/// request. `anp_keepalive_reads_cut_total` counts the cuts. The pauses
/// shape the traffic (each is far longer than 5 ms); nothing waits on
/// them.
#[test]
fn a_pacing_keep_alive_client_has_its_head_read_cut_once_not_per_request() {
    let app = App::start();
    let (gw, admin) = Gateway::start_with_admin(&GatewayConfig::default());
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    let mut c = common::client::Conn::connect(gw.addr);
    for i in 0..8 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = c.request("GET", &format!("/alice/paced/{i}"), &[], b"");
        assert_eq!(r.status, 200, "request {i}: {}", r.summary());
    }
    let cut = metrics(admin)
        .get("anp_keepalive_reads_cut_total")
        .copied()
        .expect("anp_keepalive_reads_cut_total in /metrics");
    // One cut (two if a loaded machine fired a timer late once); without
    // the cold start it is one per pause, seven.
    assert!(
        (1.0..=2.0).contains(&cut),
        "expected the hot read cut once for 7 pauses of 50 ms, got {cut}"
    );
    assert_eq!(app.requests_to("/alice/paced/").len(), 8);
}
