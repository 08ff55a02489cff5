//! Hardening, round two (issue #15): what an outside attacker found, each
//! as a regression test on the real binaries. Every test here failed on the
//! code before the fix.
//!
//! - An anonymous flood whose requests time out cancels thousands of
//!   requests still waiting for a receiver permit: the receiver survives,
//!   loses no permit, and serves the next request.
//! - A panic in a worker thread ends the process with status 70, never a
//!   half-alive process (fault injected through the debug-only
//!   `ANP_PROXY_FAULT_PANIC_PATH`).
//! - Slow uploads are cut (`request_body_timeout`, `request_body_min_rate`)
//!   and hold no receiver permit while they trickle
//!   (`request_buffer_size`).
//! - A second receiver instance with the same credentials follows the
//!   `duplicate_tunnels` policy.
//! - A connection that sends nothing is held for `header_timeout`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::client::{self, Conn};
use common::procs::{Proc, ReceiverConfig};
use common::{wait_until, App, Gateway, GatewayConfig, Receiver, ALICE_TOKEN};

/// Hang guard for facts the tests wait on.
const WAIT: Duration = Duration::from_secs(60);

/// Stderr (log) lines of `p` containing `needle`.
fn log_count(p: &Proc, needle: &str) -> usize {
    p.stderr_lines(0)
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

fn receiver(gw: SocketAddr, app: SocketAddr, extra: &str) -> ReceiverConfig {
    let mut r = ReceiverConfig::new(gw, app, ALICE_TOKEN, 1);
    r.extra_toml = extra.into();
    r
}

fn gateway(extra: &str) -> GatewayConfig {
    let mut cfg = GatewayConfig::default();
    cfg.extra_gateway_toml += extra;
    cfg
}

// ------------------------------------------- 1. cancelled permit waiters

/// The crash: more requests than `max_concurrent` wait for a permit, the
/// gateway's `timeout` cancels them in bursts, and a waiter that was just
/// granted a permit is cancelled in the same tick. `local_sync`'s semaphore
/// panicked there ("already borrowed"), killing the receiver's runtime.
#[test]
fn thousands_of_cancelled_permit_waiters_never_kill_the_receiver() {
    const CLIENTS: usize = 250;
    const EACH: usize = 20;
    const N: usize = CLIENTS * EACH; // 5,000 requests, every one cancelled
    const PERMITS: u32 = 4;
    let app = App::start();
    let gw = Gateway::start(&GatewayConfig {
        timeout: 1.0,
        ..GatewayConfig::default()
    });
    let mut cfg = receiver(gw.addr, app.addr, "");
    cfg.max_concurrent = PERMITS;
    let mut rx = Receiver::start_with(&cfg);
    rx.wait_connected(1);

    // Every request is held by the app (never released): the first
    // PERMITS of each wave hold permits, the rest wait in line, and all
    // get 504 when `timeout` cancels them.
    let addr = gw.addr;
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            thread::spawn(move || {
                let mut statuses = Vec::with_capacity(EACH);
                for i in 0..EACH {
                    let hold = format!("w{c}-{i}");
                    let r =
                        client::request(addr, "GET", "/alice/held", &[("X-Test-Hold", &hold)], b"");
                    statuses.push(r.status);
                }
                statuses
            })
        })
        .collect();
    let mut others = Vec::new();
    for w in workers {
        for s in w.join().expect("client thread") {
            if s != 504 {
                others.push(s);
            }
        }
    }
    assert!(
        others.is_empty(),
        "every held request should end in 504 at the gateway's timeout; also got {others:?}"
    );
    // The receiver saw every one of them cancelled …
    wait_until(
        &format!("{N} `request cancelled by the gateway` lines in the receiver's log"),
        WAIT,
        || log_count(&rx.proc, "request cancelled by the gateway") >= N,
    );
    // … is still running, and lost no permit: PERMITS requests at once
    // are all served.
    assert!(
        rx.proc.exited().is_none(),
        "the receiver died under {N} cancelled requests: {:?}",
        rx.proc.exited()
    );
    let after: Vec<_> = (0..PERMITS)
        .map(|i| {
            thread::spawn(move || {
                client::request(addr, "GET", &format!("/alice/after/{i}"), &[], b"").status
            })
        })
        .collect();
    let after: Vec<u16> = after.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        after,
        vec![200; PERMITS as usize],
        "after {N} cancellations every permit should be free again"
    );
    assert_eq!(
        log_count(&rx.proc, "panicked"),
        0,
        "a receiver thread panicked"
    );
}

// ------------------------------------------------------ 2. panic policy

#[test]
fn a_panicking_receiver_worker_ends_the_process_with_status_70() {
    let app = App::start();
    let gw = Gateway::start(&GatewayConfig::default());
    let mut cfg = receiver(gw.addr, app.addr, "");
    cfg.env = vec![("ANP_PROXY_FAULT_PANIC_PATH".into(), "/alice/boom".into())];
    let mut rx = Receiver::start_with(&cfg);
    rx.wait_connected(1);
    let r = client::request(gw.addr, "GET", "/alice/fine", &[], b"");
    assert_eq!(r.status, 200, "{}", r.summary());
    let r = client::request(gw.addr, "GET", "/alice/boom", &[], b"");
    assert!(
        r.status == 502 || r.status == 503,
        "the request whose handling panicked: expected 502/503, got {}",
        r.summary()
    );
    assert_eq!(
        rx.proc.wait_exit(WAIT).code(),
        Some(70),
        "a worker panic must end the receiver with status 70"
    );
    // Waited for, not counted: the log pipe is read by another thread.
    rx.proc.wait_log(&["injected fault"]);
}

#[test]
fn a_panicking_gateway_worker_ends_the_process_with_status_70() {
    let env = [(
        "ANP_PROXY_FAULT_PANIC_PATH".to_string(),
        "/boom".to_string(),
    )];
    let mut gw = Gateway::start_toml_env(&GatewayConfig::default().to_toml(), &env);
    let r = client::request(gw.addr, "GET", "/health", &[], b"");
    assert_eq!(r.status, 200, "{}", r.summary());
    let mut c = TcpStream::connect(gw.addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "the panicking worker should not have answered: {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(
        gw.proc.wait_exit(WAIT).code(),
        Some(70),
        "a worker panic must end the gateway with status 70"
    );
}

// ----------------------------------------------------- 3. slow uploads

/// A client that sends 10 bytes every 100 ms (100 B/s, never a long gap)
/// is cut with 408 once its grace is over, and the app never sees it.
#[test]
fn a_trickling_upload_is_cut_with_408() {
    let app = App::start();
    let mut gw = Gateway::start(&gateway(
        "request_body_timeout = 1.0\nrequest_body_min_rate = 1000\n",
    ));
    let mut rx = Receiver::start_with(&receiver(gw.addr, app.addr, ""));
    rx.wait_connected(1);

    let mut c = Conn::connect(gw.addr);
    c.set_read_timeout(WAIT);
    c.write_raw(
        b"POST /alice/trickle HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
        &["POST"],
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = c.try_clone_writer();
    let s = stop.clone();
    // Pacing, not synchronisation: the trickle itself is the attack.
    let trickler = thread::spawn(move || {
        for _ in 0..600 {
            if s.load(Ordering::Relaxed) || writer.write_all(&[b'x'; 10]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    let r = c.read().expect("a response to the trickling upload");
    stop.store(true, Ordering::Relaxed);
    let _ = trickler.join();
    assert_eq!(
        r.status,
        408,
        "expected 408 for 100 B/s, got {}",
        r.summary()
    );
    // The gateway's log says the upload was slower than the minimum rate.
    gw.proc.wait_log(&["request_body_min_rate"]);
    assert!(
        app.requests_to("/alice/trickle").is_empty(),
        "a small body still arriving must not have reached the app"
    );
}

/// Slow uploads to one identity do not take its receiver's permits: with
/// `max_concurrent = 2` and twenty uploads stalled mid-body, a normal
/// request is answered at once, and the stalled uploads finish when their
/// clients send the rest.
#[test]
fn stalled_uploads_hold_no_receiver_permit() {
    const SLOW: usize = 20;
    let app = App::start();
    let gw = Gateway::start(&GatewayConfig {
        timeout: 5.0,
        ..GatewayConfig::default()
    });
    let mut cfg = receiver(gw.addr, app.addr, "");
    cfg.max_concurrent = 2;
    let mut rx = Receiver::start_with(&cfg);
    rx.wait_connected(1);

    let mut slow: Vec<Conn> = (0..SLOW)
        .map(|i| {
            let mut c = Conn::connect(gw.addr);
            c.set_read_timeout(WAIT);
            let head =
                format!("POST /alice/slow/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx");
            c.write_raw(head.as_bytes(), &["POST"]).unwrap();
            c
        })
        .collect();
    let r = client::request(gw.addr, "GET", "/alice/normal", &[], b"");
    assert_eq!(
        r.status,
        200,
        "with {SLOW} uploads stalled mid-body, a normal request should be served: {}",
        r.summary()
    );
    for (i, c) in slow.iter_mut().enumerate() {
        c.write_raw(&[b'y'; 99], &[]).unwrap();
        let r = c.read().expect("the finished upload's response");
        assert_eq!(r.status, 200, "slow upload {i}: {}", r.summary());
        assert_eq!(r.header("x-echo-body-len"), Some("100"), "{}", r.summary());
    }
}

// ------------------------------------------------ 4. duplicate tunnels

fn alice_with_instance(gw: SocketAddr, app: SocketAddr, id: &str) -> Receiver {
    Receiver::start_with(&receiver(gw, app, &format!("instance_id = \"{id}\"\n")))
}

fn stats(admin: SocketAddr) -> serde_json::Value {
    let r = client::request(admin, "GET", "/stats", &[], b"");
    assert_eq!(r.status, 200, "{}", r.summary());
    serde_json::from_slice(&r.body).expect("/stats is JSON")
}

#[test]
fn duplicate_tunnels_refuse_keeps_the_first_instance() {
    let (app_a, app_b) = (App::start(), App::start());
    let mut gw = Gateway::start(&gateway("duplicate_tunnels = \"refuse\"\n"));
    let mut a = alice_with_instance(gw.addr, app_a.addr, "rx-a");
    a.wait_connected(1);
    let b = alice_with_instance(gw.addr, app_b.addr, "rx-b");
    wait_until("the second instance to be refused with 409", WAIT, || {
        b.proc
            .stderr_lines(0)
            .iter()
            .any(|l| l.contains("tunnel refused") && l.contains("409"))
    });
    gw.proc.wait_log(&["duplicate_instance"]);
    for i in 0..20 {
        let r = client::request(gw.addr, "GET", &format!("/alice/r/{i}"), &[], b"");
        assert_eq!(r.status, 200, "{}", r.summary());
    }
    assert_eq!(app_a.requests_to("/alice/r/").len(), 20);
    assert!(
        app_b.requests_to("/alice/r/").is_empty(),
        "the refused instance got traffic"
    );
}

#[test]
fn duplicate_tunnels_share_is_the_default_warns_and_shows_in_stats() {
    let (app_a, app_b) = (App::start(), App::start());
    let (mut gw, admin) = Gateway::start_with_admin(&GatewayConfig::default());
    let mut a = alice_with_instance(gw.addr, app_a.addr, "rx-a");
    a.wait_connected(1);
    let mut b = alice_with_instance(gw.addr, app_b.addr, "rx-b");
    b.wait_connected(1);
    // Logged at warn level (waited for: the log pipe is read by another
    // thread, and may lag the receiver's stdout).
    gw.proc.wait_log(&["WARN", "a second receiver instance"]);
    let s = stats(admin);
    let inst = &s["instances_by_identity"]["alice"];
    assert_eq!(inst["rx-a"], 1, "/stats instances: {s}");
    assert_eq!(inst["rx-b"], 1, "/stats instances: {s}");
}

#[test]
fn duplicate_tunnels_replace_closes_the_first_instance() {
    let (app_a, app_b) = (App::start(), App::start());
    let gw = Gateway::start(&gateway("duplicate_tunnels = \"replace\"\n"));
    let mut a = alice_with_instance(gw.addr, app_a.addr, "rx-a");
    a.wait_connected(1);
    let mut b = alice_with_instance(gw.addr, app_b.addr, "rx-b");
    b.wait_connected(1);
    assert_eq!(
        a.proc.wait_exit(WAIT).code(),
        Some(3),
        "a replaced receiver stops (exit 3) instead of fighting back"
    );
    for i in 0..20 {
        let r = client::request(gw.addr, "GET", &format!("/alice/r/{i}"), &[], b"");
        assert_eq!(r.status, 200, "{}", r.summary());
    }
    assert_eq!(app_b.requests_to("/alice/r/").len(), 20);
    assert!(app_a.requests_to("/alice/r/").is_empty());
}

// ----------------------------------------------- 5. silent connections

#[test]
fn a_connection_that_sends_nothing_is_closed_at_header_timeout() {
    let gw = Gateway::start(&GatewayConfig {
        keepalive_timeout: 600.0,
        extra_gateway_toml: "header_timeout = 1.0\n".into(),
        ..GatewayConfig::default()
    });
    let mut c = Conn::connect(gw.addr);
    // The hang guard is far below keepalive_timeout: only header_timeout
    // can close it in time.
    c.set_read_timeout(Duration::from_secs(30));
    assert!(
        c.is_closed_by_peer(),
        "a silent new connection should be closed after header_timeout (1 s), not keepalive_timeout (600 s)"
    );
}

/// A client that asks for a large response and then reads nothing (a
/// slow-read attack) is cut after `send_timeout`: the gateway's write to
/// it fails, the response ends (its access-log line is written with the
/// bytes that left) and the app call is cancelled at the receiver, so the
/// client holds no receiver permit for longer. Another client is served
/// meanwhile and after.
#[test]
fn a_client_that_stops_reading_is_cut_after_send_timeout() {
    const BODY: usize = 48 << 20;
    let app = App::start();
    // One worker: the response streams through its tunnel's credit window.
    let mut gw = Gateway::start(&GatewayConfig {
        workers: 1,
        ..gateway("send_timeout = 1\n")
    });
    let mut rx = Receiver::start_with(&receiver(gw.addr, app.addr, ""));
    rx.wait_connected(1);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&gw.addr.into()).unwrap();
    let mut stalled: TcpStream = sock.into();
    stalled
        .write_all(
            format!("GET /alice/unread HTTP/1.1\r\nHost: x\r\nX-Test-Body-Len: {BODY}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    // It reads nothing. The gateway gives the response up …
    let line = gw.proc.wait_stdout("\"path\":\"/alice/unread\"");
    let sent: u64 = line
        .split("\"bytes_out\":")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bytes_out in {line}"));
    assert!(sent < BODY as u64, "the whole body left: {line}");
    // Its access line keeps the status sent and says why the body is short.
    assert!(
        line.contains("\"status\":200")
            && line.contains("\"error\":\"client connection failed mid-response"),
        "expected a 200 cut mid-response in {line}"
    );
    // … and the receiver gives the app call up.
    rx.proc
        .wait_log(&["request cancelled by the gateway", "client went away"]);
    let r = client::request(gw.addr, "GET", "/alice/after", &[], b"");
    assert_eq!(r.status, 200, "{}", r.summary());
    // The stalled client finds its connection cut once it reads.
    stalled.set_read_timeout(Some(WAIT)).unwrap();
    let mut sink = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        match stalled.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got < BODY, "the stalled client got the whole body");
}
