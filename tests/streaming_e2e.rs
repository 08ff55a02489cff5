//! End-to-end acceptance of streaming (issue #5): real `anp-proxy gateway`
//! and `anp-proxy receiver` processes, a streaming test app
//! (tests/streaming/app.rs) and raw HTTP/1.1 clients that read bodies
//! incrementally (tests/streaming/wire.rs).
//!
//! Streaming is proven by **ordering**, never by a stopwatch: the app emits
//! event n+1 only after the client confirmed event n (a buffering proxy
//! deadlocks and the hang guard fails the test); a 100 MiB response left
//! unread must not have been fully written by the app when 100 other
//! requests on the same tunnel have completed; an aborted client must make
//! the app see its request end early. Memory is checked from
//! `/proc/<pid>/status` during 1 GiB transfers. Ports are 0; every wait is
//! on a stdout line, a channel or a socket; timeouts are hang guards.

mod common;

#[path = "streaming/app.rs"]
mod app;
#[path = "streaming/wire.rs"]
mod wire;

use app::{epoch, AppEvent, StreamApp, EVENT_LEN};
use common::app::{pattern_body, sha256_hex};
use common::procs::{Proc, ReceiverConfig};
use common::{App, Gateway, GatewayConfig, Receiver, ALICE_TOKEN};
use sha2::{Digest, Sha256};
use std::io;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;
use wire::{mib, source_sha256, HttpConn, RssSampler, Source};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Peak RSS allowed to the gateway and to the receiver during 1 GiB transfers.
const RSS_LIMIT: u64 = 64 * MIB;

/// A gateway, an alice receiver with `tunnels` tunnels (all connected) and
/// the streaming app behind it.
fn start(cfg: &GatewayConfig, tunnels: u32) -> (StreamApp, Gateway, Receiver) {
    let app = StreamApp::start();
    let gw = Gateway::start(cfg);
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, tunnels);
    rx.wait_connected(tunnels as usize);
    (app, gw, rx)
}

fn big_body_config() -> GatewayConfig {
    GatewayConfig {
        max_body_size: 2 * GIB, // 1 GiB bodies are allowed; streaming must keep them out of memory
        ..GatewayConfig::default()
    }
}

fn check_memory(what: &str, gw: &Gateway, rx: &Receiver, use_: &[wire::MemUse]) {
    let (g, r) = (use_[0], use_[1]);
    println!(
        "{what}: gateway peak RSS {:.1} MiB sampled / VmHWM {:.1} MiB; receiver {:.1} MiB sampled / VmHWM {:.1} MiB ({} samples)",
        mib(g.max_sampled_rss),
        mib(g.hwm),
        mib(r.max_sampled_rss),
        mib(r.hwm),
        g.samples
    );
    for (name, pid, u) in [
        ("gateway", gw.proc.child.id(), g),
        ("receiver", rx.proc.child.id(), r),
    ] {
        assert!(
            u.samples > 1,
            "{what}: expected several RSS samples of the {name}, got {}",
            u.samples
        );
        assert!(
            u.max_sampled_rss < RSS_LIMIT && u.hwm < RSS_LIMIT,
            "{what}: expected the {name} (pid {pid}) to stay under {} MiB, but its RSS reached {:.1} MiB sampled / {:.1} MiB VmHWM",
            mib(RSS_LIMIT),
            mib(u.max_sampled_rss),
            mib(u.hwm)
        );
    }
}

// ---------------------------------------------------------------- 1 GiB

#[test]
fn one_gib_upload_streams_through_with_bounded_memory() {
    let (mut app, gw, rx) = start(&big_body_config(), 2);
    let sampler = RssSampler::start(&[gw.proc.child.id(), rx.proc.child.id()]);

    let mut c = HttpConn::connect(gw.addr);
    c.send_head(
        "POST",
        "/alice/upload?id=up1g",
        &[("Content-Length", &GIB.to_string())],
    );
    let mut src = Source::new(11, GIB);
    let mut h = Sha256::new();
    while let Some(b) = src.next_block() {
        h.update(b);
        c.write(b)
            .unwrap_or_else(|e| panic!("expected the gateway to keep taking the upload: {e}"));
    }
    let sent_sha = hex::encode(h.finalize());
    let head = c
        .read_head("POST")
        .unwrap_or_else(|e| panic!("expected a response to the 1 GiB upload: {e}"));
    let body = c.body_bytes().expect("upload response body");
    let mem = sampler.finish();

    assert_eq!(head.status, 200, "upload answered {}", head.status);
    assert_eq!(body, b"ok");
    assert_eq!(head.header("x-upload-len"), Some(GIB.to_string().as_str()));
    assert_eq!(
        head.header("x-upload-sha256"),
        Some(sent_sha.as_str()),
        "the app must have hashed exactly the bytes sent"
    );
    app.wait(
        "UploadDone for up1g",
        |e| matches!(e, AppEvent::UploadDone { id, read } if id == "up1g" && *read == GIB),
    );
    println!("1 GiB upload: sha256 {sent_sha} matches at the app");
    check_memory("1 GiB upload", &gw, &rx, &mem);
}

#[test]
fn one_gib_download_streams_through_with_bounded_memory() {
    let (mut app, gw, rx) = start(&big_body_config(), 2);
    let sampler = RssSampler::start(&[gw.proc.child.id(), rx.proc.child.id()]);

    let mut c = HttpConn::connect(gw.addr);
    c.send_head(
        "GET",
        &format!("/alice/download?id=down1g&len={GIB}&seed=22"),
        &[],
    );
    let head = c.read_head("GET").expect("download head");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(GIB.to_string().as_str()),
        "the app's Content-Length must be kept on a streamed response"
    );
    assert!(head.header("transfer-encoding").is_none());
    let (len, got_sha) = c
        .hash_body()
        .unwrap_or_else(|e| panic!("expected the whole 1 GiB body: {e}"));
    let mem = sampler.finish();

    assert_eq!(len, GIB);
    app.wait("DownloadDone for down1g", |e| {
        matches!(e, AppEvent::DownloadDone { id, written } if id == "down1g" && *written == GIB)
    });
    let want_sha = source_sha256(22, GIB);
    assert_eq!(got_sha, want_sha, "1 GiB download arrived altered");
    println!("1 GiB download: sha256 {got_sha} matches the app's body");
    check_memory("1 GiB download", &gw, &rx, &mem);
}

// ---------------------------------------------------------------- events

/// Reads lock-step events: after each parsed event the app is allowed the
/// next one. Returns the emission-to-arrival delays (ms).
fn lockstep_events(app: &StreamApp, gw: &Gateway, framing: &str, n: usize) -> Vec<f64> {
    let id = format!("ev-{framing}");
    let gate = app.gate(&id);
    let mut c = HttpConn::connect(gw.addr);
    c.send_head(
        "GET",
        &format!("/alice/events?id={id}&n={n}&framing={framing}"),
        &[("Accept", "text/event-stream")],
    );
    let head = c.read_head("GET").expect("event stream head");
    assert_eq!(head.status, 200, "{framing}: event stream status");
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    if framing == "length" {
        assert_eq!(
            head.header("content-length"),
            Some((n * EVENT_LEN).to_string().as_str()),
            "{framing}: the app's Content-Length must be kept"
        );
    } else {
        assert_eq!(
            head.header("transfer-encoding"),
            Some("chunked"),
            "{framing}: a body of unknown length goes chunked to an HTTP/1.1 client"
        );
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut delays = Vec::with_capacity(n);
    for want in 0..n {
        let ev = loop {
            if let Some(p) = pending.windows(2).position(|w| w == b"\n\n") {
                let ev: Vec<u8> = pending.drain(..p + 2).collect();
                break ev;
            }
            let got = c.read_body(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "{framing}: expected event {want} (the app sends it only after event {} was confirmed); the response stalled or ended: {e}",
                    want.saturating_sub(1)
                )
            });
            assert!(got > 0, "{framing}: body ended before event {want}");
            pending.extend_from_slice(&buf[..got]);
        };
        let arrived = epoch().elapsed().as_nanos() as u64;
        let text = String::from_utf8(ev).expect("event is text");
        let mut parts = text.trim_end().trim_start_matches("data: ").split(' ');
        let idx: usize = parts.next().unwrap().parse().expect("event index");
        let emitted: u64 = parts.next().unwrap().parse().expect("event timestamp");
        assert_eq!(idx, want, "{framing}: events out of order");
        assert!(
            pending.is_empty(),
            "{framing}: nothing after event {want} can exist before it is confirmed"
        );
        delays.push(arrived.saturating_sub(emitted) as f64 / 1e6);
        if want + 1 < n {
            gate.send(()).expect("the app is waiting for the go-ahead");
        }
    }
    let rest = c.body_bytes().expect("the event stream ends cleanly");
    assert!(
        rest.is_empty(),
        "{framing}: unexpected bytes after the last event"
    );
    delays
}

fn print_delays(what: &str, d: &mut [f64]) {
    d.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{what}: {} events, emission→arrival delay min {:.3} ms, median {:.3} ms, max {:.3} ms",
        d.len(),
        d[0],
        d[d.len() / 2],
        d[d.len() - 1]
    );
}

#[test]
fn sse_and_chunked_responses_arrive_event_by_event() {
    let (app, gw, _rx) = start(&GatewayConfig::default(), 2);
    for (framing, what) in [
        ("chunked", "SSE, app sends chunked"),
        ("close", "SSE, app sends until close"),
        ("length", "SSE, app sends Content-Length"),
    ] {
        let mut d = lockstep_events(&app, &gw, framing, 50);
        print_delays(what, &mut d);
    }
}

// ---------------------------------------------------------------- slow client

#[test]
fn unread_100_mib_response_does_not_block_100_small_requests_on_one_tunnel() {
    let cfg = GatewayConfig {
        workers: 1,
        ..GatewayConfig::default()
    };
    let (mut app, gw, _rx) = start(&cfg, 1);
    let big_len = 100 * MIB;

    let mut big = HttpConn::connect(gw.addr);
    big.send_head(
        "GET",
        &format!("/alice/download?id=big&len={big_len}&seed=33"),
        &[],
    );
    let head = big.read_head("GET").expect("big response head");
    assert_eq!(head.status, 200);
    // Nothing of its body is read until the small requests are done.

    let n = 100;
    let barrier = Arc::new(Barrier::new(n));
    let addr = gw.addr;
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let b = barrier.clone();
            thread::spawn(move || {
                let mut c = HttpConn::connect(addr);
                b.wait();
                let len = 1000 + i as u64;
                c.send_head(
                    "GET",
                    &format!("/alice/download?id=small{i}&len={len}&seed={i}"),
                    &[],
                );
                let head = c
                    .read_head("GET")
                    .unwrap_or_else(|e| panic!("small request {i}: no response head: {e}"));
                assert_eq!(head.status, 200, "small request {i}");
                let (got_len, sha) = c
                    .hash_body()
                    .unwrap_or_else(|e| panic!("small request {i}: body: {e}"));
                assert_eq!(
                    (got_len, sha),
                    (len, source_sha256(i as u64, len)),
                    "small request {i} got the wrong body"
                );
            })
        })
        .collect();
    for h in handles {
        h.join()
            .expect("every small request completes while the big response is unread");
    }
    let seen = app.seen();
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, AppEvent::DownloadDone { id, .. } if id == "big")),
        "expected the app to be held back on the unread 100 MiB response (backpressure through the tunnel), but it had written all of it: {seen:?}"
    );
    println!("slow client: {n} small requests completed on one tunnel while the 100 MiB response stayed unread and unfinished at the app");

    let (len, sha) = big.hash_body().expect("the big response, read at last");
    assert_eq!(len, big_len);
    assert_eq!(sha, source_sha256(33, big_len), "big response altered");
    app.wait(
        "DownloadDone for big",
        |e| matches!(e, AppEvent::DownloadDone { id, .. } if id == "big"),
    );
}

// ---------------------------------------------------------------- cancel

/// The app's read of the body fails (it must not see a complete upload);
/// the receiver lets the call go quietly: a client leaving is not a fault
/// of the receiver or its app, and anyone can do it at will, so it is a
/// debug line (`upstream call abandoned`), never the `upstream call
/// failed` warning an operator would be paged by.
#[test]
fn client_leaving_mid_upload_aborts_the_app_request() {
    let mut app = StreamApp::start();
    let gw = Gateway::start(&GatewayConfig::default());
    let mut cfg = ReceiverConfig::new(gw.addr, app.addr, ALICE_TOKEN, 2);
    cfg.env
        .push(("RUST_LOG".into(), "info,anp_proxy::receiver=debug".into()));
    let mut rx = Receiver::start_with(&cfg);
    rx.wait_connected(2);
    for chunked in [false, true] {
        let id = if chunked {
            "abort-chunked"
        } else {
            "abort-length"
        };
        let declared = 32 * MIB;
        let mut c = HttpConn::connect(gw.addr);
        let target = format!("/alice/upload?id={id}&notify=65536");
        if chunked {
            c.send_head("POST", &target, &[("Transfer-Encoding", "chunked")]);
        } else {
            c.send_head(
                "POST",
                &target,
                &[("Content-Length", &declared.to_string())],
            );
        }
        let mut src = Source::new(44, MIB);
        while let Some(b) = src.next_block() {
            if chunked {
                for piece in b.chunks(64 * 1024) {
                    c.write_chunk(piece).unwrap();
                }
            } else {
                c.write(b).unwrap();
            }
        }
        // The app is reading this body now …
        app.wait(
            &format!("UploadProgress for {id}"),
            |e| matches!(e, AppEvent::UploadProgress { id: i, .. } if i == id),
        );
        // … and the client goes away.
        let _ = c.writer.shutdown(std::net::Shutdown::Both);
        drop(c);
        let ev = app.wait(&format!("UploadAborted for {id} (the app's read of the body must fail once the client left)"), |e| {
            matches!(e, AppEvent::UploadAborted { id: i, .. } if i == id)
        });
        let AppEvent::UploadAborted {
            read,
            expected,
            error,
            ..
        } = &ev
        else {
            unreachable!()
        };
        assert!(
            *read <= MIB,
            "{id}: the app read {read} bytes, more than the client sent"
        );
        if !chunked {
            assert_eq!(*expected, Some(declared));
        }
        println!("{id}: app saw its request aborted after {read} body bytes ({error})");
        let line = rx.proc.wait_log(&["upstream call abandoned"]);
        let failed: Vec<_> = rx
            .proc
            .stderr_lines(0)
            .into_iter()
            .filter(|l| l.contains("upstream call failed"))
            .collect();
        assert!(
            failed.is_empty(),
            "{id}: a client leaving was logged as a failure: {failed:?} (then: {line})"
        );
        assert!(
            !app.seen()
                .iter()
                .any(|e| matches!(e, AppEvent::UploadDone { id: i, .. } if i == id)),
            "{id}: an aborted upload must not look complete to the app"
        );
    }
}

/// Aborts this many downloads at different points: whether the receiver
/// is waiting for credit (with part of it granted) when the cancel arrives
/// depends on where the client stops, so one cut point is not enough.
const DOWNLOAD_ABORTS: usize = 24;

#[test]
fn client_leaving_mid_download_aborts_the_app_response() {
    let (mut app, gw, _rx) = start(&GatewayConfig::default(), 2);
    let mut after = Vec::new();
    for i in 0..DOWNLOAD_ABORTS {
        let id = format!("dl-abort-{i}");
        let mut c = HttpConn::connect(gw.addr);
        c.send_head(
            "GET",
            &format!("/alice/download?id={id}&len={GIB}&seed=5"),
            &[],
        );
        let head = c
            .read_head("GET")
            .unwrap_or_else(|e| panic!("{id}: expected a response head: {e}"));
        assert_eq!(head.status, 200, "{id}");
        // Stop somewhere between 256 KiB and ~2.3 MiB, at odd offsets.
        let cut = 256 * 1024 + i * 90_001;
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < cut {
            let want = (cut - got).min(buf.len());
            let n = c
                .read_body(&mut buf[..want])
                .unwrap_or_else(|e| panic!("{id}: body before the cut: {e}"));
            assert!(n > 0);
            got += n;
        }
        let _ = c.writer.shutdown(std::net::Shutdown::Both);
        drop(c);
        // The app sees its write fail within milliseconds; 20 s is a hang guard.
        let ev = app.wait_for(
            &format!("DownloadFailed for {id} (the upstream call must be cancelled when the client leaves)"),
            Duration::from_secs(20),
            |e| matches!(e, AppEvent::DownloadFailed { id: x, .. } | AppEvent::DownloadDone { id: x, .. } if *x == id),
        );
        match ev {
            AppEvent::DownloadFailed { written, .. } => {
                assert!(written < GIB);
                after.push(written);
            }
            other => {
                panic!(
                    "{id}: expected the app's write to fail after the client left, got {other:?}"
                )
            }
        }
    }
    after.sort_unstable();
    println!(
        "dl-abort: {DOWNLOAD_ABORTS} downloads cancelled; the app's write failed after {:.1}..{:.1} MiB",
        mib(after[0]),
        mib(after[after.len() - 1])
    );
    // The tunnels survived the cancels: new connections still get answers.
    for k in 0..8 {
        let mut c = HttpConn::connect(gw.addr);
        c.send_head(
            "GET",
            &format!("/alice/download?id=after{k}&len=100&seed={k}"),
            &[],
        );
        let h = c
            .read_head("GET")
            .unwrap_or_else(|e| panic!("request {k} after the cancels: {e}"));
        assert_eq!(h.status, 200, "request {k} after the cancels");
        assert_eq!(c.hash_body().unwrap(), (100, source_sha256(k, 100)));
    }
}

/// A client that leaves while the app pauses mid-body (an event stream
/// between two events) ends its request at once: the gateway watches it
/// once the pause is longer than a moment, and the receiver is told to
/// give the app call up, long before the app's next piece or
/// `stream_idle_timeout`.
#[test]
fn a_client_that_leaves_during_a_pause_mid_body_cancels_its_request() {
    let cfg = GatewayConfig {
        workers: 1,
        ..GatewayConfig::default()
    };
    let (app, gw, mut rx) = start(&cfg, 1);
    let id = "pause-chunked";
    let gate = app.gate(id);
    let mut c = HttpConn::connect(gw.addr);
    c.send_head("GET", &format!("/alice/stall?id={id}&framing=chunked"), &[]);
    let head = c.read_head("GET").expect("stalled response head");
    assert_eq!(head.status, 200);
    let first = b"first piece of a body that will not end\n";
    let mut got = 0;
    let mut buf = [0u8; 1024];
    while got < first.len() {
        let n = c.read_body(&mut buf).expect("first piece");
        assert!(n > 0);
        got += n;
    }
    // The app now waits on its gate (until the test ends); the client leaves.
    drop(c);
    rx.proc
        .wait_log(&["request cancelled by the gateway", "client went away"]);
    drop(gate);
}

// ---------------------------------------------------------------- receiver failures

#[test]
fn receiver_dying_mid_body_ends_the_client_response_visibly() {
    let (mut app, mut gw, mut rx) = start(&GatewayConfig::default(), 2);
    let mut conns = Vec::new();
    let mut gates = Vec::new();
    for framing in ["chunked", "length"] {
        let id = format!("stall-{framing}");
        gates.push(app.gate(&id));
        let mut c = HttpConn::connect(gw.addr);
        c.send_head(
            "GET",
            &format!("/alice/stall?id={id}&framing={framing}"),
            &[],
        );
        let head = c.read_head("GET").expect("stalled response head");
        assert_eq!(head.status, 200);
        if framing == "chunked" {
            assert_eq!(head.header("transfer-encoding"), Some("chunked"));
        } else {
            assert!(head.header("content-length").is_some());
        }
        let first = b"first piece of a body that will not end\n";
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while got.len() < first.len() {
            let n = c.read_body(&mut buf).expect("first piece");
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            &got[..],
            &first[..],
            "{framing}: first piece streamed ahead of the rest"
        );
        conns.push((framing, c));
    }
    app.wait(
        "BodyStarted x2",
        |e| matches!(e, AppEvent::BodyStarted { id } if id == "stall-length"),
    );
    rx.kill();
    for (framing, mut c) in conns {
        let mut buf = [0u8; 1024];
        let end = loop {
            match c.read_body(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(_) => continue,
                Err(e) => break Err(e),
            }
        };
        match end {
            Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => {
                println!("receiver died mid-body ({framing}): client sees {:?}: {e}", e.kind());
            }
            Err(e) => panic!("{framing}: expected the connection to close without completing the body, got {e}"),
            Ok(()) => panic!("{framing}: expected an incomplete body (no final chunk / short of Content-Length), but the response looked complete"),
        }
    }
    // Their access lines keep the 200 sent and say why they are short.
    let line = gw.proc.wait_stdout("\"path\":\"/alice/stall\"");
    let cut = "\"status\":200,";
    let why = "\"error\":\"response failed mid-body: tunnel closed\"";
    assert!(
        line.contains(cut) && line.contains(why),
        "expected a 200 cut mid-body in {line}"
    );
    drop(gates);
}

#[test]
fn receiver_dying_before_the_head_gives_502() {
    let (mut app, gw, mut rx) = start(&GatewayConfig::default(), 2);
    let gate = app.gate("hold1");
    let mut c = HttpConn::connect(gw.addr);
    c.send_head("POST", "/alice/hold?id=hold1", &[("Content-Length", "5")]);
    c.write(b"hello").unwrap();
    app.wait(
        "Arrived hold1",
        |e| matches!(e, AppEvent::Arrived { id } if id == "hold1"),
    );
    rx.kill();
    let head = c
        .read_head("POST")
        .expect("a response after the receiver died");
    assert_eq!(head.status, 502, "receiver died before the head");
    drop(gate);
}

// ---------------------------------------------------------------- cross-core

fn find_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(|x| x.as_u64())
            .or_else(|| m.values().find_map(|x| find_u64(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_u64(x, key)),
        _ => None,
    }
}

fn stats(admin: std::net::SocketAddr) -> serde_json::Value {
    let r = common::client::request(admin, "GET", "/stats", &[], b"");
    assert_eq!(r.status, 200, "admin /stats: {}", r.summary());
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("admin /stats is not JSON ({e}): {}", r.body_text()))
}

/// A two-worker gateway (admin on), the stream app, and alice's receiver
/// with `tunnels` tunnels, connected.
fn two_cores(tunnels: u32) -> (StreamApp, Gateway, std::net::SocketAddr, Receiver) {
    let cfg = GatewayConfig {
        workers: 2,
        ..GatewayConfig::default()
    };
    let app = StreamApp::start();
    let (gw, admin) = Gateway::start_with_admin(&cfg);
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, tunnels);
    rx.wait_connected(tunnels as usize);
    (app, gw, admin, rx)
}

#[test]
fn no_cross_core_dispatch_with_a_tunnel_per_core() {
    let (_app, gw, admin, _rx) = two_cores(2);

    let run = |conns: usize, per_conn: usize| small_requests(gw.addr, conns, per_conn);
    run(10, 20); // warm-up
    let s0 = stats(admin);
    let tunnels = find_u64(&s0, "tunnels");
    assert_eq!(
        tunnels,
        Some(2),
        "admin /stats should count 2 tunnels: {s0}"
    );
    // One tunnel on each core: the gateway placed them, whatever core
    // SO_REUSEPORT accepted them on.
    assert_eq!(
        s0["tunnels_by_identity"]["alice"],
        serde_json::json!([1, 1]),
        "expected alice's 2 tunnels spread one per core: {s0}"
    );
    let before = find_u64(&s0, "cross_core_dispatch_total")
        .unwrap_or_else(|| panic!("admin /stats has no cross_core_dispatch_total: {s0}"));
    run(50, 200);
    let s1 = stats(admin);
    let after = find_u64(&s1, "cross_core_dispatch_total").unwrap();
    println!(
        "cross-core: cross_core_dispatch_total {before} after warm-up, {after} after 10000 requests on 50 connections (2 workers, 2 tunnels)"
    );
    println!("admin /stats after: {s1}");
    assert_eq!(
        after,
        before,
        "expected no cross-core dispatch with one tunnel per core, got {} over 10000 requests",
        after - before
    );
    assert_eq!(before, 0, "cross-core dispatch already during warm-up");
}

/// `conns` new client connections, `per_conn` small requests each.
fn small_requests(addr: std::net::SocketAddr, conns: usize, per_conn: usize) {
    let handles: Vec<_> = (0..conns)
        .map(|k| {
            thread::spawn(move || {
                let mut c = HttpConn::connect(addr);
                for i in 0..per_conn {
                    c.send_head("GET", &format!("/alice/download?id=x&len=16&seed={k}"), &[]);
                    let h = c
                        .read_head("GET")
                        .unwrap_or_else(|e| panic!("conn {k} request {i}: {e}"));
                    assert_eq!(h.status, 200, "conn {k} request {i}");
                    let b = c.body_bytes().expect("body");
                    assert_eq!(b.len(), 16);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("all requests answered");
    }
}

/// The control for the test above: with one tunnel and two cores, the core
/// without it must cross (and count) — so a zero there means something.
#[test]
fn a_core_without_a_tunnel_crosses_and_counts_it() {
    let (app, gw, admin, _rx) = two_cores(1);
    // 50 fresh connections: SO_REUSEPORT puts some on each core (all on
    // one core has probability 2^-49).
    small_requests(gw.addr, 50, 4);
    let s = stats(admin);
    let crossed = find_u64(&s, "cross_core_dispatch_total").unwrap();
    println!("cross-core with one tunnel for two cores: {crossed} of 200 requests");
    assert!(
        crossed > 0 && crossed < 200,
        "expected some (not all) of 200 requests to cross cores, got {crossed}: {s}"
    );
    drop(app);
}

/// Events stream across cores too: with one tunnel for two cores, an
/// event stream whose connection landed on the core without it still
/// arrives event by event (the app sends the next only after the client
/// saw the last), not gathered on the tunnel's core until its end.
#[test]
fn events_stream_event_by_event_across_cores() {
    let (app, gw, admin, _rx) = two_cores(1);
    let crossed = || find_u64(&stats(admin), "cross_core_dispatch_total").unwrap();
    for i in 0.. {
        assert!(i < 64, "64 event streams and none crossed cores");
        let before = crossed();
        let mut d = lockstep_events(&app, &gw, "chunked", 5);
        if crossed() > before {
            print_delays("SSE across cores", &mut d);
            break;
        }
    }
}

/// A connection to the core without alice's one tunnel: one whose small
/// request crossed cores (`cross_core_dispatch_total` rose). A connection
/// stays on the core that accepted it, so its next requests cross too.
fn crossing_conn(gw: &Gateway, admin: std::net::SocketAddr) -> HttpConn {
    let crossed = || find_u64(&stats(admin), "cross_core_dispatch_total").unwrap();
    for _ in 0..64 {
        let before = crossed();
        let mut c = HttpConn::connect(gw.addr);
        c.send_head("GET", "/alice/download?id=probe&len=16&seed=1", &[]);
        let h = c.read_head("GET").expect("probe answered");
        assert_eq!(h.status, 200, "probe request");
        c.body_bytes().expect("probe body");
        if crossed() > before {
            return c;
        }
    }
    panic!("64 connections and none landed on the core without the tunnel");
}

/// Uploads stream across cores too: with one tunnel for two cores, an
/// upload on a connection of the core without it reaches the app while the
/// client is still sending (the client sends the rest only after the app
/// has read its first MiB: a gateway that gathers the body before it
/// crosses deadlocks here), arrives whole, and a client that leaves
/// mid-upload aborts the app's request.
#[test]
fn an_upload_streams_across_cores() {
    let (mut app, gw, admin, _rx) = two_cores(1);
    let len = 32 * MIB;
    for (id, chunked) in [("across-length", false), ("across-chunked", true)] {
        let mut c = crossing_conn(&gw, admin);
        let target = format!("/alice/upload?id={id}&notify={MIB}");
        match chunked {
            true => c.send_head("POST", &target, &[("Transfer-Encoding", "chunked")]),
            false => c.send_head("POST", &target, &[("Content-Length", &len.to_string())]),
        }
        let mut src = Source::new(21, len);
        let mut sent = 0u64;
        while let Some(b) = src.next_block() {
            if sent == 2 * MIB {
                app.wait(
                    &format!("UploadProgress for {id} while the client still sends"),
                    |e| matches!(e, AppEvent::UploadProgress { id: i, .. } if i == id),
                );
            }
            if chunked {
                c.write_chunk(b).unwrap();
            } else {
                c.write(b).unwrap();
            }
            sent += b.len() as u64;
        }
        if chunked {
            c.write_chunk(b"").unwrap();
        }
        let head = c.read_head("POST").expect("upload answered");
        assert_eq!(head.status, 200, "{id}: answered {}", head.status);
        assert_eq!(
            head.header("x-upload-len"),
            Some(len.to_string().as_str()),
            "{id}"
        );
        assert_eq!(
            head.header("x-upload-sha256"),
            Some(source_sha256(21, len).as_str()),
            "{id}: the app must have hashed exactly the bytes sent"
        );
        println!("{id}: 32 MiB crossed cores streamed, sha256 matches at the app");
    }
    // Leaving mid-upload, across cores.
    let mut c = crossing_conn(&gw, admin);
    let target = format!("/alice/upload?id=across-abort&notify={MIB}");
    c.send_head("POST", &target, &[("Content-Length", &len.to_string())]);
    let mut src = Source::new(22, 2 * MIB);
    while let Some(b) = src.next_block() {
        c.write(b).unwrap();
    }
    app.wait(
        "UploadProgress for across-abort",
        |e| matches!(e, AppEvent::UploadProgress { id, .. } if id == "across-abort"),
    );
    let _ = c.writer.shutdown(std::net::Shutdown::Both);
    drop(c);
    let ev = app.wait(
        "UploadAborted for across-abort (the app's read must fail once the client left)",
        |e| matches!(e, AppEvent::UploadAborted { id, .. } if id == "across-abort"),
    );
    println!("across-abort: {ev:?}");
}

// ---------------------------------------------------------------- plain v1 fallback

/// The plain v1 receiver (tests/streaming/plain_v1_receiver.py) for
/// alice, once it has printed `CONNECTED {json}`: the process and that
/// JSON (the gateway's 101).
fn plain_v1_peer(gw: &Gateway, app: std::net::SocketAddr) -> (Proc, serde_json::Value) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/streaming/plain_v1_receiver.py"
    );
    let args = [script, &gw.ws_url(), ALICE_TOKEN, &app.to_string()];
    let mut p = Proc::start("plain-v1", "python3", args, &[]);
    let line = p.wait_line("a CONNECTED line", |l| l.starts_with("CONNECTED "));
    let hello: serde_json::Value =
        serde_json::from_str(&line["CONNECTED ".len()..]).expect("CONNECTED json");
    (p, hello)
}

fn random_body(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

#[test]
fn plain_v1_receiver_works_through_the_whole_message_fallback() {
    let app = App::start();
    let gw = Gateway::start(&GatewayConfig::default());
    let (peer, hello) = plain_v1_peer(&gw, app.addr);
    assert_eq!(hello["status"], 101, "{hello}");
    let headers = hello["headers"].as_object().expect("101 headers");
    assert!(
        !headers.contains_key("x-anpx-features"),
        "a peer that offered no extensions must get none (no X-ANPX-Features in the 101): {hello}"
    );
    println!("plain v1 peer: 101 headers {}", hello["headers"]);

    let mut served = 0;
    // Uploads, echoed back: small, and larger than one 64 KiB frame both ways.
    for (n, seed) in [(100usize, 1u64), (70_000, 2), (300 * 1024, 3)] {
        let body = random_body(n, seed);
        let r = common::client::request(gw.addr, "POST", "/alice/echo", &[], &body);
        assert_eq!(r.status, 200, "echo {n}: {}", r.summary());
        assert_eq!(r.header("x-echo-body-len"), Some(n.to_string().as_str()));
        assert_eq!(
            r.header("x-echo-body-sha256"),
            Some(sha256_hex(&body).as_str()),
            "upload of {n} altered"
        );
        assert_eq!(r.body.len(), n);
        assert!(r.body == body, "echoed body of {n} bytes altered");
        served += 1;
    }
    // Downloads: Content-Length and chunked from the app.
    for (n, chunked) in [(10usize, false), (200_000, false), (150_000, true)] {
        let len = n.to_string();
        let mut h = vec![("X-Test-Body-Len", len.as_str())];
        if chunked {
            h.push(("X-Test-Chunked", "1"));
        }
        let r = common::client::request(gw.addr, "GET", "/alice/dl", &h, b"");
        assert_eq!(r.status, 200, "download {n}: {}", r.summary());
        assert!(
            r.body == pattern_body(n),
            "download of {n} bytes (chunked app: {chunked}) altered"
        );
        served += 1;
    }
    plain_peer_served(peer, served);
}

/// The plain v1 peer, stopped, flagged nothing a reference peer could not
/// take and served `served` requests.
fn plain_peer_served(peer: Proc, served: usize) {
    let lines = peer.finish();
    let violations: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("VIOLATION"))
        .collect();
    assert!(
        violations.is_empty(),
        "the gateway sent a plain v1 peer something the reference cannot take: {violations:?}"
    );
    let served_lines = lines.iter().filter(|l| l.starts_with("SERVED ")).count();
    assert_eq!(
        served_lines, served,
        "the plain peer served every request: {lines:?}"
    );
}

/// A chunked upload larger than one piece, from a core without the plain
/// v1 peer's tunnel: it crosses streamed (`Tunnel::call_streamed`) and is
/// gathered on the tunnel's core, since a v1 peer takes a message only
/// whole, and goes on with its length (the peer flags a body whose
/// `content-length` is missing or wrong as a violation).
#[test]
fn a_chunked_upload_crossing_to_a_plain_v1_peer_arrives_whole_and_sized() {
    let app = App::start();
    let (gw, admin) = Gateway::start_with_admin(&GatewayConfig {
        workers: 2,
        ..GatewayConfig::default()
    });
    let (peer, _hello) = plain_v1_peer(&gw, app.addr);
    let crossed = || find_u64(&stats(admin), "cross_core_dispatch_total").unwrap();
    let n = 300 * 1024;
    let body = random_body(n, 7);
    let mut served = 0;
    for i in 0.. {
        assert!(i < 64, "64 uploads and none crossed cores");
        let before = crossed();
        let mut c = HttpConn::connect(gw.addr);
        c.send_head("POST", "/alice/echo", &[("Transfer-Encoding", "chunked")]);
        for piece in body.chunks(20_000) {
            c.write_chunk(piece).unwrap();
        }
        c.write_chunk(b"").unwrap();
        let head = c.read_head("POST").expect("echo answered");
        let echoed = c.body_bytes().expect("echo body");
        assert_eq!(head.status, 200, "upload {i}");
        assert_eq!(head.header("x-echo-body-len"), Some(n.to_string().as_str()));
        assert!(echoed == body, "upload {i}: echoed body altered");
        served += 1;
        if crossed() > before {
            println!(
                "chunked 300 KiB upload crossed to the plain v1 peer's core after {served} uploads"
            );
            break;
        }
    }
    plain_peer_served(peer, served);
}
