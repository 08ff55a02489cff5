//! WebSocket pass-through end to end (issue 14, PROTOCOL.md §7.6): a real
//! WebSocket app and a real client library (Python `websockets` from PyPI,
//! in the venv `tests/interop/setup_venv.sh` makes under
//! `target/interop-venv`; `tests/ws_passthrough/ws.py`) talking through the
//! real gateway and receiver binaries on one tunnel. The scenarios check
//! their own results (every echo compared, every close code); this file
//! starts the processes, waits on their lines and checks what the gateway
//! says about the streams (access log, metrics, log lines).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::procs::{self, Gateway, GatewayConfig, Proc, Receiver, ALICE_TOKEN};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Hang guard for one scenario (a loaded machine, a debug build).
const RUN: Duration = Duration::from_secs(240);

fn python() -> &'static Path {
    procs::interop_python()
}

fn script() -> String {
    format!("{ROOT}/tests/ws_passthrough/ws.py")
}

/// The WebSocket app, once it listens.
fn ws_app() -> (Proc, SocketAddr) {
    let mut p = Proc::start("ws-app", python(), [script().as_str(), "app"], &[]);
    let line = p.wait_line("LISTENING <port>", |l| l.starts_with("LISTENING "));
    let port: u16 = line["LISTENING ".len()..].trim().parse().expect("port");
    (p, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Runs client scenario `name`; its `RESULT` JSON (panics on `FAIL`).
fn scenario(name: &str, args: &[&str]) -> serde_json::Value {
    scenario_env(name, args, &[])
}

/// [`scenario`] with environment variables (`WS_CA_FILE` for wss://).
fn scenario_env(name: &str, args: &[&str], env: &[(String, String)]) -> serde_json::Value {
    let mut argv = vec![script(), "client".into(), name.into()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let mut p = Proc::start(&format!("ws-{name}"), python(), &argv, env);
    let line = p.wait_line_within(&format!("{name}: RESULT or FAIL"), RUN, |l| {
        l.starts_with("RESULT ") || l.starts_with("FAIL ")
    });
    assert!(line.starts_with("RESULT "), "scenario {name}: {line}");
    let v: serde_json::Value = serde_json::from_str(&line["RESULT ".len()..]).expect("json");
    println!("{name}: {v}");
    v
}

/// `workers` cores, one tunnel (everything shares it), access log on
/// stdout, admin listener for `/metrics`.
struct Rig {
    app: Proc,
    gw: Gateway,
    admin: SocketAddr,
    rx: Receiver,
}

impl Rig {
    fn start(extra_gateway_toml: &str) -> Rig {
        Rig::with_workers(1, extra_gateway_toml)
    }

    fn with_workers(workers: u32, extra_gateway_toml: &str) -> Rig {
        let (app, app_addr) = ws_app();
        let cfg = GatewayConfig {
            workers,
            extra_gateway_toml: extra_gateway_toml.into(),
            logging_toml: "level = \"info\"\nlog_dir = \"\"\naccess_log = true\n".into(),
            ..GatewayConfig::default()
        };
        let (gw, admin) = Gateway::start_with_admin(&cfg);
        let mut rx = Receiver::start(gw.addr, app_addr, ALICE_TOKEN, 1);
        rx.wait_connected(1);
        Rig { app, gw, admin, rx }
    }

    fn ws(&self) -> String {
        format!("ws://{}/alice", self.gw.addr)
    }

    fn http(&self) -> String {
        format!("http://{}/alice", self.gw.addr)
    }

    /// A metric's value on `/metrics`.
    fn metric(&self, name: &str) -> u64 {
        let r = common::client::request(self.admin, "GET", "/metrics", &[], b"");
        let text = r.body_text();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not on /metrics:\n{text}"))
    }

    /// Waits for the gateway's access-log line of a finished stream to
    /// `path` (status 101); its JSON.
    fn access_line(&mut self, path: &str) -> serde_json::Value {
        let want = format!("\"path\":\"{path}\"");
        let line = self
            .gw
            .proc
            .wait_line(&format!("access line of {path}"), |l| {
                l.contains(&want) && l.contains("\"status\":101")
            });
        serde_json::from_str(&line).expect("access line json")
    }
}

#[test]
fn echo_pings_pushes_and_close_codes_pass_through() {
    let mut r = Rig::start("");
    let ws = r.ws();
    // 10,000 messages, text and binary alternating, up to 1 MiB, each
    // compared with what was sent.
    let v = scenario("echo", &[&ws, "10000"]);
    assert_eq!(v["echoed"], 10_000);
    r.app.wait_line("the app's end of the echo session", |l| {
        l == "APP_CLOSED echo 1000"
    });
    let line = r.access_line("/alice/echo");
    let (up, down) = (
        line["bytes_in"].as_u64().unwrap(),
        line["bytes_out"].as_u64().unwrap(),
    );
    assert!(
        up > 10 << 20 && down > 10 << 20,
        "one access line for the stream, with its bytes each way (ten 1 MiB messages went each way): {line}"
    );
    assert!(line["duration_ms"].as_f64().unwrap() > 0.0, "{line}");
    // Pings from the client get their pongs (from the app: we relay).
    let v = scenario("ping", &[&ws]);
    assert_eq!(v["pongs"], 20);
    // The app pushes to a silent client.
    let v = scenario("push", &[&ws, "1000"]);
    assert_eq!(v["pushed"], 1000);
    // Close codes both ways: the app reports what the client sent...
    let v = scenario("close", &[&ws]);
    for code in ["1000", "1001", "4000"] {
        let want = format!("APP_CLOSED client{code} {code}");
        r.app.wait_line(&want, |l| l == want);
        // ...and the client checked what the app sent (with its reason).
        assert_eq!(v["server_codes"][code], code.parse::<u64>().unwrap(), "{v}");
    }
    // Counted: every stream above opened and closed.
    r.gw.proc
        .wait_log(&["upgraded stream closed", "/alice/close"]);
    assert!(r.metric("anp_upgraded_streams_total") >= 9);
    let open = r.metric("anp_upgraded_streams_open");
    assert!(open <= 1, "streams still open after their close: {open}");
    drop(r.rx);
}

#[test]
fn two_hundred_sessions_and_a_stalled_reader_on_one_tunnel() {
    // Two cores, one tunnel: the connections accepted on the core without
    // it are handed to the one with it (counted as cross-core).
    let r = Rig::with_workers(2, "");
    // 200 sessions open at once on the one tunnel, each echoing, while
    // HTTP requests keep being served through it.
    let v = scenario("many", &[&r.ws(), &r.http(), "200"]);
    assert_eq!(v["sessions"], 200);
    assert!(v["http"]["during"].as_u64().unwrap() > 0, "{v}");
    let moved = r.metric("anp_proxy_cross_core_dispatch_total");
    println!("sessions (and HTTP requests) from the core without the tunnel: {moved}");
    assert!(
        moved > 0,
        "200 connections over two cores: some must have moved"
    );
    // A client that reads nothing while the app floods it: 4,000 echoes
    // and 50 HTTP requests beside it complete, and the flood is held to a
    // bounded amount (the app blocks in its send).
    let v = scenario("stall", &[&r.ws(), &r.http()]);
    assert_eq!(v["echoed"], 4000);
    assert_eq!(v["http"], 50);
    // The other way round: an app that reads nothing while the client
    // keeps sending; the sender blocks, the others go on.
    let v = scenario("stall_app", &[&r.ws(), &r.http()]);
    assert_eq!(v["echoed"], 4000);
    assert_eq!(v["http"], 50);
    assert!(r.metric("anp_upgraded_streams_total") >= 206);
}

#[test]
fn garbage_after_the_101_and_a_killed_receiver_end_only_their_streams() {
    let mut r = Rig::start("");
    let ws = r.ws();
    // Bytes that are no WebSocket frames: relayed, the app fails its
    // connection, and it ends; nothing else is affected.
    let v = scenario("garbage", &[&ws]);
    assert_eq!(v["ended"], true);
    r.app
        .wait_line("the app's end of the garbage session", |l| {
            l.starts_with("APP_CLOSED garbage ")
        });
    let v = scenario("echo", &[&ws, "200"]);
    assert_eq!(v["echoed"], 200);
    let h = common::client::request(r.gw.addr, "GET", "/alice/http/after-garbage", &[], b"");
    assert_eq!(h.status, 200, "{}", h.summary());
    // A session open when the receiver dies: the client's connection ends.
    let mut p = Proc::start(
        "ws-kill",
        python(),
        [script().as_str(), "client", "kill", &ws],
        &[],
    );
    p.wait_line("READY", |l| l == "READY");
    r.rx.kill();
    let line = p.wait_line_within("RESULT or FAIL", RUN, |l| {
        l.starts_with("RESULT ") || l.starts_with("FAIL ")
    });
    assert!(line.starts_with("RESULT "), "{line}");
    r.gw.proc
        .wait_log(&["upgraded stream closed", "reason=tunnel closed"]);
}

/// A raw WebSocket handshake to the echo route, tagged.
fn handshake(addr: SocketAddr, tag: &str) -> String {
    format!(
        "GET /alice/echo?tag={tag} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// An upgraded stream, open (its 101 read), that sends nothing.
fn open_silent(addr: SocketAddr, tag: &str) -> common::Conn {
    let mut c = common::Conn::connect(addr);
    c.write_raw(handshake(addr, tag).as_bytes(), &["GET"])
        .unwrap();
    let h = c.read_head_only().expect("101 head");
    assert_eq!(h.0, 101, "{tag}");
    c
}

#[test]
fn one_stream_over_max_upgraded_per_identity_gets_503() {
    let mut r = Rig::start("max_upgraded_per_identity = 2\nupgrade_idle_timeout = 0\n");
    let addr = r.gw.addr;
    let a = open_silent(addr, "limit-a");
    let b = open_silent(addr, "limit-b");
    // A third for the same identity: 503, with a log line saying why.
    let third = common::client::send_raw(addr, handshake(addr, "third").as_bytes());
    assert_eq!(third.status, 503, "{}", third.summary());
    assert!(
        third.body_text().contains("upgraded_limit"),
        "{}",
        third.summary()
    );
    assert!(third.header("retry-after").is_some(), "{}", third.summary());
    r.gw.proc
        .wait_log(&["max_upgraded_per_identity", "identity=alice"]);
    // One ends: its place is free again.
    drop(a);
    r.gw.proc
        .wait_log(&["upgraded stream closed", "closed by both ends"]);
    let c = open_silent(addr, "limit-c");
    drop((b, c));
}

/// A client that vanishes mid-stream is nothing the receiver or its app
/// did: the receiver lets the stream go quietly (a debug line). The
/// gateway's cancel reaches a stream's upload
/// and its cancel latch in either order, and about half of such clients
/// were warned about as `upgraded stream failed` (request aborted before
/// its body was complete).
#[test]
fn clients_that_vanish_mid_stream_are_no_failure_at_the_receiver() {
    use tungstenite::Message;
    const CLIENTS: usize = 12;
    let (_app, app_addr) = ws_app();
    let cfg = GatewayConfig {
        workers: 2,
        ..GatewayConfig::default()
    };
    let gw = Gateway::start(&cfg);
    let mut rcfg = common::procs::ReceiverConfig::new(gw.addr, app_addr, ALICE_TOKEN, 1);
    rcfg.env
        .push(("RUST_LOG".into(), "info,anp_proxy::receiver=debug".into()));
    let mut rx = Receiver::start_with(&rcfg);
    rx.wait_connected(1);
    for i in 0..CLIENTS {
        let url = format!("ws://{}/alice/echo?tag=vanish{i}", gw.addr);
        let tcp = std::net::TcpStream::connect(gw.addr).unwrap();
        tcp.set_read_timeout(Some(RUN)).unwrap();
        let (mut ws, _) = tungstenite::client(url.as_str(), tcp).expect("handshake");
        let m = Message::binary(vec![7u8; 50_000]);
        ws.send(m.clone()).unwrap();
        assert_eq!(ws.read().unwrap(), m, "client {i}: echo");
        ws.send(Message::binary(vec![8u8; 50_000])).unwrap();
        // Gone without a close frame: a reset (linger 0), not a FIN, which
        // would be a half-close the stream carries on with.
        let tcp = ws.get_ref();
        socket2::SockRef::from(tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(ws);
    }
    let (mut quiet, mut failed) = (0, Vec::new());
    while quiet + failed.len() < CLIENTS {
        let line = rx
            .proc
            .wait_log_where("each stream's end at the receiver", |l| {
                l.contains("upgraded stream ended by the gateway")
                    || l.contains("upgraded stream failed")
            });
        match line.contains("upgraded stream failed") {
            true => failed.push(line),
            false => quiet += 1,
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {CLIENTS} vanished clients were warned about as failures: {failed:?}",
        failed.len()
    );
}

#[test]
fn an_idle_stream_is_closed_at_both_ends() {
    let mut r = Rig::start("upgrade_idle_timeout = 1\n");
    let mut a = open_silent(r.gw.addr, "idle-a");
    // Silent both ways for upgrade_idle_timeout: the gateway ends it, the
    // app's connection is closed (through the receiver) and the client's.
    r.gw.proc
        .wait_log(&["upgraded stream closed", "reason=idle"]);
    r.app.wait_line("the app sees the idle stream end", |l| {
        l.starts_with("APP_CLOSED idle-a ")
    });
    assert!(a.is_closed_by_peer(), "the client's connection is closed");
}

#[test]
fn a_plain_v1_receiver_still_gets_501_and_h2c_is_not_upgraded() {
    let app = common::App::start();
    let gw = Gateway::start(&GatewayConfig {
        workers: 1,
        ..GatewayConfig::default()
    });
    let peer_script = format!("{ROOT}/tests/streaming/plain_v1_receiver.py");
    let mut peer = Proc::start(
        "plain-v1",
        "python3",
        [
            peer_script.as_str(),
            &gw.ws_url(),
            ALICE_TOKEN,
            &app.addr.to_string(),
        ],
        &[],
    );
    peer.wait_line("CONNECTED", |l| l.starts_with("CONNECTED "));
    let mut c = common::Conn::connect(gw.addr);
    let r = c.request(
        "GET",
        "/alice/chat",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        &[],
    );
    assert_eq!(r.status, 501, "{}", r.summary());
    assert!(r.body_text().contains("upgrade_refused"), "{}", r.summary());
    assert!(c.is_closed_by_peer(), "the 501 closes the connection");
    // h2c is never upgraded: served over HTTP/1.1 like any request.
    let r = common::client::request(
        gw.addr,
        "GET",
        "/alice/h2c",
        &[
            ("Upgrade", "h2c"),
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        ],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.summary());
    let lines = peer.finish();
    assert!(
        !lines.iter().any(|l| l.starts_with("VIOLATION")),
        "the plain peer got something it cannot take: {lines:?}"
    );
}

// ---------------------------------------------------------------- half-close

/// An app that answers every upgrade with a 101 and then does what its
/// path says, reporting what it read to the test:
/// `/alice/half/client-first`: reads to EOF, then writes `got N` and closes;
/// `/alice/half/app-first`: writes `bye from app`, shuts its write side,
/// then reads to EOF; `/alice/half/garbage`: writes bytes that are no
/// WebSocket frames and closes.
fn raw_upgrade_app() -> (SocketAddr, std::sync::mpsc::Receiver<(String, Vec<u8>)>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split(' ').nth(1).unwrap_or_default().to_string();
                let _ = s.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                );
                let mut read = Vec::new();
                match path.as_str() {
                    "/alice/half/client-first" => {
                        let _ = s.read_to_end(&mut read);
                        let _ = s.write_all(format!("got {}", read.len()).as_bytes());
                    }
                    "/alice/half/app-first" => {
                        let _ = s.write_all(b"bye from app");
                        let _ = s.shutdown(std::net::Shutdown::Write);
                        let _ = s.read_to_end(&mut read);
                    }
                    _ => {
                        let _ = s.write_all(&[0xff, 0x00, 0x13, 0x37, b'\r', b'\n', 0x80]);
                    }
                }
                let _ = tx.send((head, read));
            });
        }
    });
    (addr, rx)
}

/// Opens an upgrade to `path` through the gateway; the stream after the
/// 101 head (which is returned too).
fn raw_upgrade(gw: SocketAddr, path: &str) -> (std::net::TcpStream, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(RUN)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {gw}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "closed in the head: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    (s, head)
}

#[test]
fn half_close_travels_both_ways_and_app_bytes_are_relayed_as_they_are() {
    use std::io::{Read, Write};
    let (app, seen) = raw_upgrade_app();
    let gw = Gateway::start(&GatewayConfig {
        workers: 1,
        ..GatewayConfig::default()
    });
    let mut rx = Receiver::start(gw.addr, app, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();

    // The client shuts its write side: the app reads to EOF, and its
    // answer still reaches the client after that.
    let (mut s, head) = raw_upgrade(gw.addr, "/alice/half/client-first");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket\r\n"), "{head}");
    assert!(lower.contains("connection: upgrade\r\n"), "{head}");
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{head}"
    );
    s.write_all(&body).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (app_head, app_read) = seen.recv_timeout(RUN).expect("the app saw EOF");
    assert!(
        app_read == body,
        "the app read {} bytes, not the 300,000 sent",
        app_read.len()
    );
    let app_head = app_head.to_ascii_lowercase();
    assert!(
        app_head.contains("connection: upgrade\r\n") && app_head.contains("upgrade: websocket\r\n"),
        "{app_head}"
    );
    assert!(
        app_head.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n"),
        "{app_head}"
    );
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(
        got, "got 300000",
        "the app's answer after the client's half-close"
    );

    // The app shuts its write side: the client reads its bytes and EOF,
    // and what it sends afterwards still reaches the app.
    let (mut s, _) = raw_upgrade(gw.addr, "/alice/half/app-first");
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye from app");
    s.write_all(&body).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (_, app_read) = seen
        .recv_timeout(RUN)
        .expect("the app saw the client's bytes and EOF");
    assert!(
        app_read == body,
        "after the app's half-close the app read {} bytes",
        app_read.len()
    );

    // Bytes that are no WebSocket frames, from the app: relayed as they
    // are, then the close.
    let (mut s, _) = raw_upgrade(gw.addr, "/alice/half/garbage");
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, [0xff, 0x00, 0x13, 0x37, b'\r', b'\n', 0x80]);
    let h = common::client::request(gw.addr, "GET", "/alice/after", &[], b"");
    assert_eq!(
        h.status,
        502,
        "the raw app answers no HTTP: {}",
        h.summary()
    );
}

/// A TLS gateway (`workers`, admin on), the ws app, and alice's receiver
/// with `tunnels` tunnels over wss://, connected.
struct TlsRig {
    _dir: tempfile::TempDir,
    app: Proc,
    gw: Gateway,
    admin: std::net::SocketAddr,
    _rx: Receiver,
    /// `WS_CA_FILE` for the scenario client.
    env: [(String, String); 1],
}

impl TlsRig {
    fn start(workers: u32, tunnels: u32) -> TlsRig {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let out = common::procs::run([
            "cert",
            "new",
            "--out",
            d.to_str().unwrap(),
            "--file",
            "server",
            "127.0.0.1",
        ]);
        assert!(out.status.success(), "cert new: {out:?}");
        let (app, app_addr) = ws_app();
        let cfg = GatewayConfig {
            workers,
            // Dotted keys, not a table: `start_with_admin` appends to [gateway].
            extra_gateway_toml: format!(
                "tls.enabled = true\ntls.cert_file = {:?}\ntls.key_file = {:?}\n",
                d.join("server.crt"),
                d.join("server.key")
            ),
            ..GatewayConfig::default()
        };
        let (gw, admin) = Gateway::start_with_admin(&cfg);
        let mut rcfg = common::procs::ReceiverConfig::new(gw.addr, app_addr, ALICE_TOKEN, tunnels);
        rcfg.gateway_url = format!("wss://{}/ws", gw.addr);
        rcfg.extra_toml += &format!("ca_file = {:?}\n", d.join("ca.crt"));
        let mut rx = Receiver::start_with(&rcfg);
        rx.wait_connected(tunnels as usize);
        let env = [(
            "WS_CA_FILE".to_string(),
            d.join("ca.crt").to_string_lossy().into_owned(),
        )];
        TlsRig {
            _dir: dir,
            app,
            gw,
            admin,
            _rx: rx,
            env,
        }
    }

    fn wss(&self) -> String {
        format!("wss://{}/alice", self.gw.addr)
    }
}

#[test]
fn wss_clients_through_a_tls_gateway() {
    // The public port serves TLS; the client speaks wss:// (a TLS stream
    // split in two halves, shut down on the app's EOF).
    let mut t = TlsRig::start(1, 1);
    let (ws, env) = (t.wss(), t.env.clone());
    let v = scenario_env("echo", &[&ws, "2000"], &env);
    assert_eq!(v["echoed"], 2000);
    let v = scenario_env("ping", &[&ws], &env);
    assert_eq!(v["pongs"], 20);
    let v = scenario_env("close", &[&ws], &env);
    assert_eq!(v["server_codes"]["4000"], 4000, "{v}");
    for code in ["1000", "1001", "4000"] {
        let want = format!("APP_CLOSED client{code} {code}");
        t.app.wait_line(&want, |l| l == want);
    }
}

/// A wss:// stream accepted on a core without alice's one tunnel: its TLS
/// session cannot move to the tunnel's core (a plain TCP connection is
/// moved), so its bytes cross through channels (`Tunnel::call_duplex`)
/// and it works as on the tunnel's own core. It got 503 before.
#[test]
fn a_wss_stream_on_a_core_without_the_tunnel_crosses_cores() {
    let t = TlsRig::start(2, 1);
    let (ws, env) = (t.wss(), t.env.clone());
    let crossed = || {
        let r = common::client::request(t.admin, "GET", "/metrics", &[], b"");
        r.body_text()
            .lines()
            .find_map(|l| {
                let v = l.strip_prefix("anp_proxy_cross_core_dispatch_total ")?;
                v.trim().parse::<u64>().ok()
            })
            .expect("anp_proxy_cross_core_dispatch_total on /metrics")
    };
    // Echoes, then close codes both ways (six streams a run), each run
    // until one of its streams crossed.
    for i in 0.. {
        assert!(i < 64, "64 wss:// streams and none crossed cores");
        let before = crossed();
        let v = scenario_env("echo", &[&ws, "500"], &env);
        assert_eq!(v["echoed"], 500, "stream {i}");
        if crossed() > before {
            println!("stream {i} crossed cores and echoed 500 messages");
            break;
        }
    }
    for i in 0.. {
        assert!(
            i < 16,
            "16 runs of six wss:// streams and none crossed cores"
        );
        let before = crossed();
        let v = scenario_env("close", &[&ws], &env);
        assert_eq!(v["server_codes"]["4000"], 4000, "{v}");
        if crossed() > before {
            break;
        }
    }
}

#[test]
fn a_tungstenite_client_echoes_and_closes_with_its_code() {
    // A second client library (Rust's tungstenite, blocking) against the
    // same app: messages both kinds, a ping's pong, and a close code the
    // app reports.
    use tungstenite::protocol::frame::coding::CloseCode;
    use tungstenite::protocol::CloseFrame;
    use tungstenite::Message;
    let mut r = Rig::start("");
    let url = format!("{}/echo?tag=tungstenite", r.ws());
    let tcp = std::net::TcpStream::connect(r.gw.addr).unwrap();
    tcp.set_read_timeout(Some(RUN)).unwrap();
    let (mut ws, resp) =
        tungstenite::client(url.as_str(), tcp).expect("handshake through the gateway");
    assert_eq!(resp.status(), 101);
    for i in 0..200usize {
        let m = if i % 2 == 0 {
            Message::text(format!("text {i} {}", "x".repeat(i * 37)))
        } else {
            Message::binary(vec![i as u8; i * 1001])
        };
        ws.send(m.clone()).unwrap();
        assert_eq!(ws.read().unwrap(), m, "echo {i}");
    }
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    ws.send(Message::text("after the ping")).unwrap();
    let mut pong = false;
    loop {
        match ws.read().unwrap() {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"are you there");
                pong = true;
            }
            Message::Text(t) => {
                assert_eq!(t.as_str(), "after the ping");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pong, "the pong came before the echo sent after the ping");
    ws.close(Some(CloseFrame {
        code: CloseCode::Library(4000),
        reason: "done".into(),
    }))
    .unwrap();
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => {
                assert_eq!(u16::from(f.code), 4000, "the app echoes the close code");
            }
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing: {e}"),
        }
    }
    // The handshake is over: the client closes its socket (the app, which
    // shut its side first, sees EOF through the tunnel).
    drop(ws);
    r.app.wait_line("APP_CLOSED tungstenite 4000", |l| {
        l == "APP_CLOSED tungstenite 4000"
    });
}
