//! End-to-end: when the receiver may hand an upstream connection to the
//! next request. Only after an exchange that left no doubt where the
//! response ended (not after HEAD, a 1xx, an answer that came before the
//! request body was all sent, `Connection: close`, HTTP/1.0, a 204 with a
//! length), and only if nothing arrived on it while it sat idle: bytes an
//! app writes past its response must reach no client.
//!
//! Real gateway and receiver processes, one tunnel, and a scripted app
//! (tests/common/scripted_app.rs) that numbers its connections, so "the
//! next request came on a fresh connection" is a fact the test reads.
//! Lock-step through channels; never sleeps.

mod common;

use common::client::{self, Conn};
use common::scripted_app::{Exchange, ScriptedApp, Seen, WAIT};
use common::{Gateway, GatewayConfig, Receiver, ALICE_TOKEN};
use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver as Rx, Sender};
use std::sync::Mutex;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
/// What an app writes after its response, as if answering a request it
/// never got: a whole response, so a reused connection would deliver it.
const LATE: &[u8] = b"HTTP/1.1 200 OK\r\nX-Smuggled: late\r\nContent-Length: 0\r\n\r\n";

/// The script's end of the lock-step: `go` once the test holds the
/// misbehaving response, `done` once the app has written what it wanted.
struct AppSide {
    go: Mutex<Rx<()>>,
    done: Sender<()>,
}

impl AppSide {
    /// Waits for the test's go-ahead, writes [`LATE`] on the same
    /// connection (the receiver may have closed it: fine), reports.
    fn late(&self, x: &mut Exchange) {
        self.go
            .lock()
            .unwrap()
            .recv_timeout(WAIT)
            .expect("app: expected the test's go-ahead for the late bytes");
        x.write(LATE);
        let _ = self.done.send(());
    }
}

/// What each target makes the app do.
fn script(x: &mut Exchange, side: &AppSide) {
    match x.req.target.as_str() {
        "/alice/ok" => {
            x.write(OK);
        }
        "/alice/head" => {
            x.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n");
        }
        "/alice/head-then-late" => {
            x.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n");
            side.late(x);
        }
        "/alice/get-then-late" => {
            x.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody");
            side.late(x);
        }
        "/alice/get-glued" => {
            x.write(
                &[
                    &b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"[..],
                    LATE,
                ]
                .concat(),
            );
        }
        "/alice/hints" => {
            x.write(
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n\
                  HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            );
        }
        "/alice/hang-up" => {
            // Reads the request, answers nothing, closes.
            x.close();
        }
        "/alice/hint-then-hang-up" => {
            x.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n");
            x.close();
        }
        "/alice/early" => {
            // Answers on the head alone, then reads the body like a
            // well-behaved server would (RFC 9112 §9.3).
            x.write(OK);
            let _ = side.done.send(());
        }
        "/alice/refuse-upload" => {
            // Refuses on the head alone and hangs up without reading the
            // body (as many servers do with an upload they refuse).
            x.write(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 7\r\n\
                  Connection: close\r\n\r\ntoo big",
            );
            x.close();
        }
        "/alice/close" => {
            x.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok");
        }
        "/alice/http10" => {
            x.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
        "/alice/no-content-with-length" => {
            x.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\n");
        }
        "/alice/switch" => {
            x.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
            );
        }
        _ => {
            x.write(b"HTTP/1.1 500 Unscripted\r\nContent-Length: 0\r\n\r\n");
        }
    }
}

struct World {
    app: ScriptedApp,
    gw: Gateway,
    _rx: Receiver,
    go: Sender<()>,
    done: Rx<()>,
}

/// One gateway worker and one tunnel: every request shares one upstream
/// pool.
fn world() -> World {
    world_on(1).0
}

/// [`world`] on `workers` gateway workers (the one tunnel on one of
/// them), and the gateway's admin address.
fn world_on(workers: u32) -> (World, SocketAddr) {
    let (go, go_rx) = mpsc::channel();
    let (done_tx, done) = mpsc::channel();
    let side = AppSide {
        go: Mutex::new(go_rx),
        done: done_tx,
    };
    let app = ScriptedApp::start(move |x| script(x, &side));
    let (gw, admin) = Gateway::start_with_admin(&GatewayConfig {
        workers,
        // Bodies stream at once (as a body over request_buffer_size does),
        // so the app can answer a head whose body has not come yet.
        extra_gateway_toml: "request_buffer_size = 0\n".into(),
        ..GatewayConfig::default()
    });
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    let w = World {
        app,
        gw,
        _rx: rx,
        go,
        done,
    };
    (w, admin)
}

impl World {
    /// Sends `method target` from a new client and checks the app saw it;
    /// the app's record of it (which connection).
    fn exchange(&self, method: &str, target: &str) -> (common::Response, Seen) {
        let r = client::request(self.gw.addr, method, target, &[], &[]);
        let seen = self.app.next_request();
        assert_eq!(
            (seen.method.as_str(), seen.target.as_str()),
            (method, target),
            "app: expected {method} {target} next"
        );
        (r, seen)
    }

    /// Lets the app write its late bytes; returns once it has.
    fn let_app_write_late(&self) {
        self.go.send(()).unwrap();
        self.app_done("to write its late bytes");
    }

    fn app_done(&self, what: &str) {
        self.done
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("expected the app {what} within {WAIT:?}"));
    }

    /// A new, unrelated client gets its own answer, and the app sees its
    /// request on a connection other than `misbehaved_on`.
    fn next_client_is_clean(&self, misbehaved_on: &Seen, after: &str) {
        let (r, seen) = self.exchange("GET", "/alice/ok");
        assert!(
            r.header("x-smuggled").is_none(),
            "after {after}: the next client got the app's stray bytes as its response: {}",
            r.summary()
        );
        assert_eq!(
            (r.status, r.body_text().as_str()),
            (200, "ok"),
            "after {after}: expected the next client's own 200 ok, got {}",
            r.summary()
        );
        assert_ne!(
            seen.conn, misbehaved_on.conn,
            "after {after}: expected the next request on a fresh app connection, \
             it reused connection {}",
            seen.conn
        );
    }
}

#[test]
fn a_clean_exchange_leaves_its_connection_for_the_next_request() {
    // The control: without it, "a fresh connection" below could pass only
    // because pooling was broken altogether.
    let w = world();
    let (r, first) = w.exchange("GET", "/alice/ok");
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "ok"),
        "{}",
        r.summary()
    );
    let (r, second) = w.exchange("GET", "/alice/ok");
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "ok"),
        "{}",
        r.summary()
    );
    assert_eq!(
        second.conn, first.conn,
        "expected a clean keep-alive connection to be reused"
    );
    assert_eq!(w.app.connections(), 1);
}

#[test]
fn bytes_an_app_writes_after_a_head_response_reach_no_client() {
    let w = world();
    let (r, head) = w.exchange("HEAD", "/alice/head-then-late");
    assert_eq!(r.status, 200, "{}", r.summary());
    assert!(r.body.is_empty());
    // The HEAD response is through; now the app writes on that connection.
    w.let_app_write_late();
    w.next_client_is_clean(&head, "a HEAD response followed by late bytes");
}

#[test]
fn bytes_an_app_writes_after_a_complete_response_reach_no_client() {
    let w = world();
    let (r, get) = w.exchange("GET", "/alice/get-then-late");
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "body"),
        "{}",
        r.summary()
    );
    // The connection looked clean when the response ended; the late bytes
    // arrive while it idles in the pool.
    w.let_app_write_late();
    w.next_client_is_clean(&get, "a complete response followed by late bytes");
}

#[test]
fn bytes_glued_to_a_response_reach_no_client() {
    let w = world();
    let (r, get) = w.exchange("GET", "/alice/get-glued");
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "body"),
        "{}",
        r.summary()
    );
    w.next_client_is_clean(&get, "a response with stray bytes in the same write");
}

#[test]
fn an_unsolicited_1xx_retires_the_connection() {
    let w = world();
    let (r, hints) = w.exchange("GET", "/alice/hints");
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "ok"),
        "{}",
        r.summary()
    );
    assert!(
        r.interim.is_empty(),
        "the 103 is not forwarded: {:?}",
        r.interim
    );
    w.next_client_is_clean(&hints, "a 103 before the 200");
}

#[test]
fn an_app_that_hangs_up_after_a_1xx_is_not_sent_the_request_again() {
    // A pooled connection that ends before any response byte is stale and
    // the request is retried on a fresh one; after a 103 it is not stale:
    // the app has the request, and a retry would run it twice.
    let w = world();
    let (_, pooled) = w.exchange("GET", "/alice/ok");
    let (r, hinted) = w.exchange("GET", "/alice/hint-then-hang-up");
    assert_eq!(hinted.conn, pooled.conn, "expected the pooled connection");
    assert_eq!(r.status, 502, "{}", r.summary());
    // The next request the app sees is the next client's, not a replay.
    w.next_client_is_clean(&hinted, "a 103 and a hang-up");
}

#[test]
fn a_pooled_connection_that_hangs_up_is_retried_for_a_get_but_never_for_a_post() {
    // The app read the request and closed without a byte: from the
    // receiver's side a stale keep-alive connection looks the same. A GET
    // may run twice (RFC 9110 §9.2.2: idempotent), so it is tried once
    // more on a fresh connection; a POST may not, so it gets 502 and the
    // app sees it once.
    let w = world();
    let (_, pooled) = w.exchange("GET", "/alice/ok");
    let (r, first) = w.exchange("GET", "/alice/hang-up");
    assert_eq!(first.conn, pooled.conn, "expected the pooled connection");
    let again = w.app.next_request();
    assert_eq!(
        (again.method.as_str(), again.target.as_str()),
        ("GET", "/alice/hang-up"),
        "the GET is retried once on a fresh connection"
    );
    assert_ne!(again.conn, first.conn);
    assert_eq!(r.status, 502, "{}", r.summary());

    let (_, pooled) = w.exchange("GET", "/alice/ok");
    let (r, post) = w.exchange("POST", "/alice/hang-up");
    assert_eq!(post.conn, pooled.conn, "expected the pooled connection");
    assert_eq!(r.status, 502, "{}", r.summary());
    // The next request the app sees is the next client's, not a replay.
    w.next_client_is_clean(&post, "a POST the app read and hung up on");
}

#[test]
fn an_answer_before_the_whole_request_body_retires_the_connection() {
    let w = world();
    let mut c = Conn::connect(w.gw.addr);
    // The head alone: the gateway streams it, the receiver writes it to
    // the app, and the app answers before any body byte exists.
    c.write_raw(
        b"POST /alice/early HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n",
        &["POST"],
    )
    .unwrap();
    let early = w.app.next_request();
    assert_eq!(early.target, "/alice/early");
    w.app_done("to answer the head of /alice/early");
    c.write_raw(b"0123456789", &[]).unwrap();
    let r = c.read().expect("a response to the early-answered POST");
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "ok"),
        "{}",
        r.summary()
    );
    w.next_client_is_clean(&early, "an answer that came before the request body");
}

/// An app that refuses an upload on its head and hangs up unread makes
/// the receiver's next body write fail; its answer is already waiting, so
/// the client gets it (not a 502), at once (not after its whole body or a
/// timeout), and its connection closes with the rest unread. The body is
/// far over the credit window: without the early answer the upload could
/// not end.
#[test]
fn an_upload_the_app_refuses_and_hangs_up_on_gets_the_apps_answer() {
    let w = world();
    refused_upload(&w, Conn::connect(w.gw.addr));
}

/// The same across cores: the client's connection is on the core without
/// the tunnel, so its upload streams through the other core's tunnel
/// (`Tunnel::call_streamed`), and the app's early answer ends it there as
/// on the tunnel's own core.
#[test]
fn an_upload_refused_across_cores_gets_the_apps_answer() {
    let (w, admin) = world_on(2);
    let crossed = || metric(admin, "anp_proxy_cross_core_dispatch_total");
    for i in 0.. {
        assert!(i < 64, "64 connections and none crossed cores");
        let before = crossed();
        let mut c = Conn::connect(w.gw.addr);
        c.write_raw(b"GET /alice/ok HTTP/1.1\r\nHost: t\r\n\r\n", &["GET"])
            .unwrap();
        let r = c.read().expect("an answer to the probe");
        assert_eq!(r.status, 200, "{}", r.summary());
        w.app.next_request();
        if crossed() > before {
            return refused_upload(&w, c);
        }
    }
}

/// A 16 MiB upload the app refuses on its head, on `c`.
fn refused_upload(w: &World, mut c: Conn) {
    let len = 16 << 20;
    c.write_raw(
        format!("POST /alice/refuse-upload HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n\r\n")
            .as_bytes(),
        &["POST"],
    )
    .unwrap();
    // The body goes from a thread of its own until it ends or the
    // gateway closes the connection; the answer is read meanwhile.
    let mut body_out = c.try_clone_writer();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let piece = vec![b'u'; 64 * 1024];
        let mut sent = 0;
        while sent < len && body_out.write_all(&piece).is_ok() {
            sent += piece.len();
        }
        sent
    });
    let r = c.read().expect("an answer to the refused upload");
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (413, "too big"),
        "{}",
        r.summary()
    );
    assert_eq!(r.header("connection"), Some("close"), "{}", r.summary());
    assert!(
        c.is_closed_by_peer(),
        "the connection closes, its body unread"
    );
    let sent = writer.join().unwrap();
    assert!(sent < len, "the whole body went up: {sent} bytes");
    let refused = w.app.next_request();
    w.next_client_is_clean(&refused, "an upload refused early");
}

/// The value of the `/metrics` sample whose name and labels are `sample`.
fn metric(admin: SocketAddr, sample: &str) -> u64 {
    let r = client::request(admin, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    let text = r.body_text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// A request body up to 256 KiB goes to the app with its head in one
/// write, so an app that answers on the head alone (reading the body
/// after) leaves no doubt, and its connection is kept: a hundred 1 KiB
/// POSTs (copied behind the head: each body arrives with its head) and a
/// hundred 48 KiB ones (gathered uncopied), one app connection. With head
/// and body as two writes the answer came between them, and about every
/// other 1 KiB POST dialled anew.
#[test]
fn small_posts_to_an_app_that_answers_on_the_head_share_one_connection() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let small_apart = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = small_apart.clone();
    let app = ScriptedApp::start(move |x| {
        // One small write is one segment on loopback; a 48 KiB writev
        // may arrive in two (the app may answer between: no doubt either
        // way, since the body was all sent in that one call).
        if x.req.target.starts_with("/alice/post/1024/") && !x.body_came_with_head() {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        x.write(OK);
    });
    let gw = Gateway::start(&GatewayConfig {
        workers: 1,
        ..GatewayConfig::default()
    });
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    let mut c = Conn::connect(gw.addr);
    for size in [1024, 48 * 1024] {
        let body = vec![b'p'; size];
        for i in 0..100 {
            let r = c.request("POST", &format!("/alice/post/{size}/{i}"), &[], &body);
            assert_eq!(
                (r.status, r.body_text().as_str()),
                (200, "ok"),
                "POST {i} of {size} bytes: {}",
                r.summary()
            );
        }
    }
    assert_eq!(
        small_apart.load(Ordering::SeqCst),
        0,
        "1 KiB POSTs whose body did not come with its head"
    );
    assert_eq!(
        app.connections(),
        1,
        "every POST should have gone on the one app connection"
    );
}

/// Hundreds of calls waiting on a slow app cost the receiver little each:
/// past the first 64 on a core, a call waiting for its response holds a
/// 16 KiB read buffer, not 72 KiB (`upstream.rs::FULL_READS`). 600 requests
/// held by the app at once: the receiver's resident memory grows by less
/// than 50 KiB per call (30 KiB measured on a debug build; 88 KiB when
/// every read gets 72 KiB).
#[test]
fn calls_waiting_on_a_slow_app_hold_small_read_buffers() {
    use std::sync::{Arc, Condvar};
    const CALLS: usize = 600;
    // 600 clients and 600 app connections here, as many in the children.
    common::sys::raise_nofile_limit();
    let release = Arc::new((Mutex::new(false), Condvar::new()));
    let held = release.clone();
    let app = ScriptedApp::start(move |x| {
        let (lock, cv) = &*held;
        let mut go = lock.lock().unwrap();
        while !*go {
            go = cv.wait(go).unwrap();
        }
        drop(go);
        x.write(OK);
    });
    let gw = Gateway::start(&GatewayConfig {
        workers: 1,
        ..GatewayConfig::default()
    });
    let mut cfg = common::procs::ReceiverConfig::new(gw.addr, app.addr, ALICE_TOKEN, 1);
    cfg.max_concurrent = 1024;
    let mut rx = Receiver::start_with(&cfg);
    rx.wait_connected(1);
    // Warm: the receiver's pools and runtime as a served request leaves them.
    release_all(&release, true);
    let r = client::request(gw.addr, "GET", "/alice/warm", &[], &[]);
    assert_eq!(r.status, 200, "{}", r.summary());
    let _ = app.next_request();
    release_all(&release, false);
    let before = common::sys::rss_kib(rx.proc.pid());

    let mut clients: Vec<Conn> = (0..CALLS).map(|_| Conn::connect(gw.addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let req = format!("GET /alice/held/{i} HTTP/1.1\r\nHost: t\r\n\r\n");
        c.write_raw(req.as_bytes(), &["GET"]).unwrap();
    }
    for _ in 0..CALLS {
        let _ = app.next_request();
    }
    let during = common::sys::rss_kib(rx.proc.pid());
    release_all(&release, true);
    for c in &mut clients {
        let r = c.read().expect("an answer once the app lets go");
        assert_eq!(r.status, 200, "{}", r.summary());
    }
    let per_call = during.saturating_sub(before) / CALLS as u64;
    assert!(
        per_call < 50,
        "{per_call} KiB of receiver memory per call waiting on the app \
         ({before} KiB before, {during} KiB with {CALLS} waiting)"
    );
}

fn release_all(release: &(Mutex<bool>, std::sync::Condvar), go: bool) {
    *release.0.lock().unwrap() = go;
    release.1.notify_all();
}

#[test]
fn head_close_http10_and_a_204_with_a_length_retire_the_connection() {
    // Each doubt alone, the app writing nothing after its response, so
    // only the rule itself can retire the connection: a HEAD (whether a
    // body follows is the app's idea), `Connection: close` and HTTP/1.0
    // (already honoured), a 204 with Content-Length, which it must not
    // have (RFC 9110 §8.6): the app thinks it is sending a body. The app
    // keeps every connection open regardless.
    let w = world();
    for (method, target, status) in [
        ("HEAD", "/alice/head", 200),
        ("GET", "/alice/close", 200),
        ("GET", "/alice/http10", 200),
        ("GET", "/alice/no-content-with-length", 204),
    ] {
        let (r, seen) = w.exchange(method, target);
        assert_eq!(r.status, status, "{method} {target}: {}", r.summary());
        w.next_client_is_clean(&seen, &format!("{method} {target}"));
    }
}

#[test]
fn a_101_nobody_asked_for_is_a_502_and_retires_the_connection() {
    // The receiver never forwards Upgrade, so what follows a 101 is not
    // HTTP: the client gets 502 at once, not a wait for a final response.
    let w = world();
    let (r, seen) = w.exchange("GET", "/alice/switch");
    assert_eq!(r.status, 502, "{}", r.summary());
    w.next_client_is_clean(&seen, "an unrequested 101");
}
