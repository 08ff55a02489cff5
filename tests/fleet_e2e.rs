//! A fleet of gateways (issue 13): one receiver attached to every gateway
//! of its `gateway_url` list, each gateway with its own tunnel set, state
//! and backoff.
//!
//! - `one_receiver_serves_through_every_gateway_and_survives_one_lost`:
//!   two gateways, one receiver listing both (one by IP, one by name);
//!   each gateway serves; the receiver's log and `/metrics` show each
//!   gateway's tunnels; after a
//!   SIGKILL of one, the receiver logs that gateway down (and only that
//!   one), the other keeps serving, and the killed one's slots back off on
//!   their own.
//!
//! - `a_did_proof_accepted_by_one_gateway_is_a_replay_at_another`: two
//!   gateways sharing one SQLite registry file; a DID-WBA upgrade header
//!   that one accepted (101) is refused by the other (401 nonce_replayed),
//!   and by the first too.
//!
//! - `proxy_protocol_names_the_client_to_the_app_the_log_and_the_limits`:
//!   a gateway with `proxy_protocol = true`; v1 and v2 headers; the client
//!   address they carry reaches the app's `X-Forwarded-For` and
//!   `Forwarded`, the access log, and `max_connections_per_ip` (counted per
//!   PROXY client, not per balancer); a connection without the header is
//!   refused and logged with its reason; the same on a tunnel port with
//!   `tunnel_proxy_protocol` (the peer of the tunnel is the header's).
//!
//! - `health_says_draining_with_503_once_a_drain_has_begun`: the admin
//!   port's `/health` is 200 `ok` while the gateway accepts and 503
//!   `draining` once SIGTERM started the drain (asked on a connection the
//!   admin port took before it closed), while a request in flight finishes.
//!
//! - `a_fleet_of_three_behind_haproxy`: the acceptance scene. Three
//!   gateways sharing one SQLite registry file, each with
//!   `proxy_protocol = true` on its public port and a tunnel port; one
//!   receiver listing the three tunnel URLs; Debian's HAProxy in TCP mode in
//!   front (`send-proxy` to one, `send-proxy-v2` to the others, HTTP
//!   health checks on `/health` with `check-send-proxy`; installed by
//!   `tests/fleet/setup_haproxy.sh` when missing; `ANP_SKIP_HAPROXY=1`
//!   skips it on purpose); client threads through
//!   HAProxy. It shows: the client address HAProxy passes reaches the app's
//!   `X-Forwarded-For` and an access log; a route added with
//!   `anp-proxy routes add` is served by all three; a DID header accepted by
//!   one gateway is refused by another; after a SIGKILL of one gateway only
//!   the requests in flight on it fail while the clients keep being served.
//!
//! - `manage_sh_restart_of_each_gateway_in_turn_fails_nothing`: three
//!   gateways run by `./manage.sh` (each its own run directory and config),
//!   the receiver on all three, HAProxy in front; `manage.sh restart
//!   gateway` of each in turn while client threads ask through HAProxy:
//!   no request fails.
//!
//! Real binaries on real sockets, ports 0; every wait is on a line or a
//! response, never a sleep.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::managed::Managed;
use common::procs::Proc;
use common::procs::ReceiverConfig;
use common::{client, wait_until, App, Gateway, GatewayConfig, Receiver, ALICE_TOKEN};

#[test]
fn one_receiver_serves_through_every_gateway_and_survives_one_lost() {
    let app = App::start();
    let cfg = GatewayConfig {
        workers: 1,
        ..GatewayConfig::default()
    };
    let mut a = Gateway::start(&cfg);
    let b = Gateway::start(&cfg);
    let mut rc = ReceiverConfig::new(a.addr, app.addr, ALICE_TOKEN, 2);
    // One string with a comma: the form an environment variable can give;
    // the second by name (looked up by the resolver thread).
    let b_url = format!("ws://localhost:{}/ws", b.addr.port());
    rc.gateway_url = format!("{}, {b_url}", a.ws_url());
    rc.extra_toml += "admin_port = 0\n";
    let mut rx = Receiver::start_with(&rc);
    // Two tunnels to each gateway, and the receiver's admin listener (the
    // lines come in either order).
    let (mut admin, mut connected) = (None, 0);
    while admin.is_none() || connected < 4 {
        let l = rx
            .proc
            .wait_line("the admin line and 4 tunnels connected", |l| {
                l.starts_with("anp-proxy receiver admin listening on ")
                    || (l.starts_with("anp-proxy receiver tunnel") && l.contains(" connected to "))
            });
        if l.starts_with("anp-proxy receiver admin") {
            admin = Some(common::procs::addr_in(&l));
        } else {
            connected += 1;
        }
    }
    let admin = admin.unwrap();
    let added = rx.proc.wait_log(&["gateway address added", &b_url]);
    assert!(added.contains(&format!("({})", b.addr)), "{added}");
    let b_label = format!("{b_url} ({})", b.addr);
    // The receiver's /metrics: tunnels up per gateway address.
    let tunnels = |label: &str| {
        let text = client::request(admin, "GET", "/metrics", &[], b"").body_text();
        let prefix = format!("anp_receiver_tunnels{{gateway=\"{label}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str())?.parse::<u64>().ok())
    };
    // Per-gateway status in the log: each with both of its tunnels up.
    let mut up = [false, false];
    let urls = [a.ws_url(), b_url.clone()];
    rx.proc
        .wait_log_where("`gateway status … tunnels_up=2` for both", |l| {
            for (i, u) in urls.iter().enumerate() {
                up[i] |= l.contains("gateway status")
                    && l.contains(u.as_str())
                    && l.contains("tunnels_up=2");
            }
            up == [true, true]
        });
    assert_eq!(
        (tunnels(&a.ws_url()), tunnels(&b_label)),
        (Some(2), Some(2)),
        "per-gateway tunnels on the receiver's /metrics"
    );
    for gw in [&a, &b] {
        let r = client::request(gw.addr, "GET", "/alice/x", &[], b"");
        assert_eq!(r.status, 200, "through {}: {}", gw.addr, r.summary());
    }
    a.kill();
    let down = rx
        .proc
        .wait_log(&["gateway down", "no tunnel connected to it"]);
    assert!(down.contains(&a.ws_url()), "{down}");
    assert!(!down.contains(&b_url), "{down}");
    rx.proc.wait_log(&["reconnecting", &a.ws_url()]);
    wait_until("/metrics showing gateway A down, B up", WAIT, || {
        tunnels(&a.ws_url()) == Some(0) && tunnels(&b_label) == Some(2)
    });
    for _ in 0..20 {
        let r = client::request(b.addr, "GET", "/alice/y", &[], b"");
        assert_eq!(r.status, 200, "through {}: {}", b.addr, r.summary());
    }
    assert!(
        rx.proc
            .stderr_lines(0)
            .iter()
            .all(|l| !(l.contains("gateway down") && l.contains(&b_url))),
        "the surviving gateway was never down"
    );
}

/// `anp-proxy did new DID --out dir`, and the document copied to where
/// `did_documents_dir = docs` looks for it.
fn did_new(dir: &Path, docs: &Path, did: &str) {
    let out = common::procs::run(["did", "new", did, "--out", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "did new: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut p = docs.to_path_buf();
    for part in did.strip_prefix("did:wba:").unwrap().split(':') {
        p.push(part);
    }
    std::fs::create_dir_all(&p).unwrap();
    std::fs::copy(dir.join("did.json"), p.join("did.json")).unwrap();
}

/// A raw WebSocket upgrade carrying `auth`: the status and the body.
fn upgrade(gw: std::net::SocketAddr, auth: &str) -> (u16, String) {
    let mut req = Vec::new();
    anp_proxy::ws::handshake::write_client_request(
        &mut req,
        &gw.to_string(),
        "/ws",
        "dGhlIHNhbXBsZSBub25jZQ==",
        &[("Authorization", auth)],
    );
    let r = client::send_raw(gw, &req);
    (r.status, r.body_text())
}

#[test]
fn a_did_proof_accepted_by_one_gateway_is_a_replay_at_another() {
    use anp_proxy::auth::didwba::{self, DidSigner};
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let did = "did:wba:agents.test:fleet:k";
    did_new(&t.join("k"), &t.join("docs"), did);
    let extra = format!(
        "auth.did_documents_dir = {:?}\nauth.dids = [{{ did = \"{did}\", paths = [\"/k\"] }}]\n\
         database.backend = \"sqlite\"\ndatabase.path = {:?}\n",
        t.join("docs").to_str().unwrap(),
        t.join("fleet.db").to_str().unwrap()
    );
    let cfg = GatewayConfig {
        workers: 1,
        extra_gateway_toml: extra,
        ..GatewayConfig::default()
    };
    let a = Gateway::start(&cfg);
    let b = Gateway::start(&cfg);
    let signer = DidSigner::load(&t.join("k/did.json"), &t.join("k/key-1_private.pem")).unwrap();
    // `service` is the Host without its port: one header fits both.
    let header = signer.didwba_header(
        "127.0.0.1",
        &didwba::sign::fresh_nonce(),
        &didwba::time::format_utc(didwba::time::now_unix()),
    );
    let (status, body) = upgrade(a.addr, &header);
    assert_eq!(status, 101, "gateway A accepts the proof: {body}");
    let (status, body) = upgrade(b.addr, &header);
    assert_eq!(status, 401, "gateway B refuses the replay: {body}");
    assert!(body.contains("nonce_replayed"), "{body}");
    let (status, body) = upgrade(a.addr, &header);
    assert_eq!(status, 401, "and so does A: {body}");
    // A fresh proof still opens a tunnel on B.
    let fresh = signer.didwba_header(
        "127.0.0.1",
        &didwba::sign::fresh_nonce(),
        &didwba::time::format_utc(didwba::time::now_unix()),
    );
    assert_eq!(upgrade(b.addr, &fresh).0, 101);
}

/// A v2 PROXY header (TCP over IPv4) for `src` → `dst`.
fn v2_header(src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4) -> Vec<u8> {
    let mut b = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    b.extend_from_slice(&src.ip().octets());
    b.extend_from_slice(&dst.ip().octets());
    b.extend_from_slice(&src.port().to_be_bytes());
    b.extend_from_slice(&dst.port().to_be_bytes());
    b
}

#[test]
fn proxy_protocol_names_the_client_to_the_app_the_log_and_the_limits() {
    let app = App::start();
    let cfg = GatewayConfig {
        workers: 1,
        // Per listener: the tunnel port takes receivers without a header.
        extra_gateway_toml: "proxy_protocol = true\nmax_connections_per_ip = 1\ntunnel_port = 0\n"
            .into(),
        ..GatewayConfig::default()
    };
    let mut gw = Gateway::start(&cfg);
    let tunnels = gw.proc.wait_stdout("anp-proxy gateway tunnels on ws://");
    let tunnel_addr = common::procs::addr_in(&tunnels);
    let mut rx = Receiver::start(tunnel_addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);

    // v1: the app and the access log see 203.0.113.9.
    let mut c = client::Conn::connect(gw.addr);
    c.write_raw(b"PROXY TCP4 203.0.113.9 127.0.0.1 40001 80\r\n", &[])
        .unwrap();
    let r = c.request("GET", "/alice/pp-v1", &[], b"");
    assert_eq!(r.status, 200, "{}", r.summary());
    let seen = &app.requests_to("/alice/pp-v1")[0];
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9"),
        "{seen:?}"
    );
    let fwd = seen.header("forwarded").unwrap_or_default();
    assert!(fwd.contains("for=203.0.113.9"), "Forwarded: {fwd}");
    let line = gw.proc.wait_line("the access line of /alice/pp-v1", |l| {
        l.contains("/alice/pp-v1")
    });
    assert!(line.contains("\"client\":\"203.0.113.9:40001\""), "{line}");

    // Per-IP limit of 1, per PROXY client: 203.0.113.9 already holds `c`,
    // so a second connection of it is refused; 198.51.100.7 (v2) is not.
    let mut again = client::Conn::connect(gw.addr);
    again
        .write_raw(b"PROXY TCP4 203.0.113.9 127.0.0.1 40002 80\r\n", &[])
        .unwrap();
    assert!(
        again.is_closed_by_peer(),
        "second connection of 203.0.113.9"
    );
    gw.proc
        .wait_log(&["connection refused", "max_connections_per_ip"]);
    let mut other = client::Conn::connect(gw.addr);
    let hdr = v2_header(
        "198.51.100.7:40003".parse().unwrap(),
        "127.0.0.1:80".parse().unwrap(),
    );
    other.write_raw(&hdr, &[]).unwrap();
    let r = other.request("GET", "/alice/pp-v2", &[], b"");
    assert_eq!(r.status, 200, "{}", r.summary());
    let seen = &app.requests_to("/alice/pp-v2")[0];
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("198.51.100.7"),
        "{seen:?}"
    );
    drop(c);

    // No header: refused, and the log says why.
    let mut bare = client::Conn::connect(gw.addr);
    bare.write_raw(b"GET /alice/bare HTTP/1.1\r\nHost: x\r\n\r\n", &["GET"])
        .unwrap();
    assert!(bare.is_closed_by_peer(), "a connection without the header");
    gw.proc
        .wait_log(&["no valid PROXY protocol header", "proxy_header_missing"]);
    assert!(app.requests_to("/alice/bare").is_empty());

    // Per listener: a tunnel port behind a balancer too.
    let cfg = GatewayConfig {
        workers: 1,
        extra_gateway_toml: "tunnel_port = 0\ntunnel_proxy_protocol = true\n".into(),
        ..GatewayConfig::default()
    };
    let mut gw2 = Gateway::start(&cfg);
    let line = gw2.proc.wait_stdout("anp-proxy gateway tunnels on ws://");
    let tport = common::procs::addr_in(&line);
    let mut req = Vec::new();
    anp_proxy::ws::handshake::write_client_request(
        &mut req,
        &tport.to_string(),
        "/ws",
        "dGhlIHNhbXBsZSBub25jZQ==",
        &[("Authorization", &format!("Bearer {ALICE_TOKEN}"))],
    );
    let proxied = [
        v2_header(
            "198.51.100.8:40004".parse().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
        ),
        req.clone(),
    ]
    .concat();
    let r = client::send_raw(tport, &proxied);
    assert_eq!(r.status, 101, "{}", r.summary());
    gw2.proc.wait_log(&["tunnel connected", "198.51.100.8"]);
    let mut bare = client::Conn::connect(tport);
    bare.write_raw(&req, &["GET"]).unwrap();
    assert!(bare.is_closed_by_peer(), "an upgrade without the header");
    gw2.proc
        .wait_log(&["no valid PROXY protocol header", "proxy_header_missing"]);
}

#[test]
fn health_says_draining_with_503_once_a_drain_has_begun() {
    let app = App::start();
    let cfg = GatewayConfig {
        workers: 1,
        extra_gateway_toml: "admin_header_timeout = 60\n".into(),
        ..GatewayConfig::default()
    };
    let (mut gw, admin) = Gateway::start_with_admin(&cfg);
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    let r = client::request(admin, "GET", "/health", &[], b"");
    assert_eq!(r.status, 200, "{}", r.summary());
    assert!(
        r.body_text().contains("\"status\":\"ok\""),
        "{}",
        r.summary()
    );
    // A request in flight keeps the draining gateway alive.
    let addr = gw.addr;
    let held = std::thread::spawn(move || {
        client::request(addr, "GET", "/alice/held", &[("X-Test-Hold", "h")], b"")
    });
    app.wait_arrived("h");
    let mut asking = client::Conn::connect(admin);
    gw.signal(libc::SIGTERM);
    gw.proc.wait_log(&["admin listener closed (draining)"]);
    let r = asking.request("GET", "/health", &[], b"");
    assert_eq!(r.status, 503, "{}", r.summary());
    assert!(
        r.body_text().contains("\"status\":\"draining\""),
        "{}",
        r.summary()
    );
    app.release("h");
    assert_eq!(held.join().unwrap().status, 200);
}

// ------------------------------------------------------ the fleet scene

const WAIT: Duration = Duration::from_secs(60);

/// `tests/fleet/setup_haproxy.sh`: the haproxy binary (installed if
/// missing). Without one the HAProxy tests fail; `ANP_SKIP_HAPROXY=1`
/// skips them on purpose (None).
fn haproxy_bin() -> Option<String> {
    if std::env::var("ANP_SKIP_HAPROXY").is_ok_and(|v| v == "1") {
        eprintln!("ANP_SKIP_HAPROXY=1: HAProxy test skipped");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fleet/setup_haproxy.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let bin = text
        .lines()
        .find_map(|l| l.strip_prefix("haproxy="))
        .unwrap_or_else(|| panic!("no haproxy= line in {text:?}"));
    Some(bin.to_owned())
}

/// HAProxy in TCP mode on a listener the test bound (127.0.0.1:0, handed
/// over as an inherited descriptor: `bind fd@N`), balancing over
/// `servers` (address, `send-proxy` or `send-proxy-v2`).
struct Haproxy {
    addr: SocketAddr,
    _proc: Proc,
    _listener: std::net::TcpListener,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(bin: &str, servers: &[(SocketAddr, &str)]) -> Haproxy {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = listener.as_raw_fd();
        let mut cfg = format!(
            "global\n    nbthread 1\n    maxconn 4000\n    log stderr format raw local0 info\n\
             defaults\n    mode tcp\n    log global\n    option tcplog\n    option dontlog-normal\n    timeout connect 500ms\n    timeout client 60s\n\
             \x20   timeout server 60s\n    timeout check 1s\n    retries 2\n    option redispatch 1\n\
             frontend edge\n    bind fd@{fd}\n    default_backend fleet\n\
             backend fleet\n    balance roundrobin\n    option httpchk\n\
             \x20   http-check send meth GET uri /health ver HTTP/1.1 hdr Host fleet\n\
             \x20   http-check expect status 200\n\
             \x20   default-server inter 200ms fall 1 rise 1 check-send-proxy\n"
        );
        for (i, (a, proxy)) in servers.iter().enumerate() {
            cfg += &format!("    server gw{} {a} {proxy} check\n", i + 1);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).unwrap();
        // Inherited by the child: no close-on-exec while it is spawned
        // (restored after; the listener stays ours, for the test's life).
        // A process another test spawns in that instant inherits it too,
        // and never accepts on it.
        set_cloexec(fd, false);
        let proc = Proc::start("haproxy", bin, ["-db", "-f", path.to_str().unwrap()], &[]);
        set_cloexec(fd, true);
        Haproxy {
            addr,
            _proc: proc,
            _listener: listener,
            _dir: dir,
        }
    }
}

fn set_cloexec(fd: i32, on: bool) {
    // SAFETY: fcntl on a descriptor this process owns (the listener).
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        libc::fcntl(fd, libc::F_SETFD, flags);
    }
}

/// One gateway of the fleet: its process, public and tunnel addresses.
struct Member {
    gw: Gateway,
    tunnel: SocketAddr,
}

fn member(cfg: &GatewayConfig) -> Member {
    let mut gw = Gateway::start(cfg);
    let line = gw.proc.wait_stdout("anp-proxy gateway tunnels on ws://");
    let tunnel = common::procs::addr_in(&line);
    Member { gw, tunnel }
}

/// A request straight to a gateway's public port, PROXY v1 header first.
fn direct(gw: SocketAddr, path: &str) -> client::Response {
    let mut c = client::Conn::connect(gw);
    c.write_raw(b"PROXY TCP4 192.0.2.1 127.0.0.1 1000 80\r\n", &[])
        .unwrap();
    c.request("GET", path, &[], b"")
}

/// What the client threads saw: successes, and each failure's start.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: Mutex<Vec<(Instant, String)>>,
}

/// Four client threads asking `addr` on fresh connections until `stop`
/// is raised: (their tally, the stop flag, the threads).
fn client_loops(
    addr: SocketAddr,
    tag: &'static str,
) -> (
    Arc<Tally>,
    Arc<AtomicBool>,
    Vec<std::thread::JoinHandle<()>>,
) {
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let loops = (0..4)
        .map(|k| {
            let (tally, stop) = (tally.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let began = Instant::now();
                    let path = format!("/alice/{tag}/{k}/{i}");
                    match client::try_request(addr, "GET", &path, &[], b"") {
                        Ok(r) if r.status == 200 => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => tally.failed.lock().unwrap().push((began, r.summary())),
                        Err(e) => tally.failed.lock().unwrap().push((began, e.to_string())),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    (tally, stop, loops)
}

#[test]
fn a_fleet_of_three_behind_haproxy() {
    let Some(haproxy) = haproxy_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let did = "did:wba:agents.test:fleet:scene";
    did_new(&t.join("k"), &t.join("docs"), did);
    let db: PathBuf = t.join("fleet.db");
    let extra = format!(
        "proxy_protocol = true\ntunnel_port = 0\n\
         auth.did_documents_dir = {:?}\nauth.dids = [{{ did = \"{did}\", paths = [\"/k\"] }}]\n\
         database.backend = \"sqlite\"\ndatabase.path = {:?}\ndatabase.poll_interval = 0.5\n",
        t.join("docs").to_str().unwrap(),
        db.to_str().unwrap()
    );
    let cfg = GatewayConfig {
        workers: 1,
        extra_gateway_toml: extra,
        ..GatewayConfig::default()
    };
    let mut fleet: Vec<Member> = (0..3).map(|_| member(&cfg)).collect();
    let app = App::start();
    let mut rc = ReceiverConfig::new(fleet[0].tunnel, app.addr, ALICE_TOKEN, 2);
    rc.gateway_url = fleet
        .iter()
        .map(|m| format!("ws://{}/ws", m.tunnel))
        .collect::<Vec<_>>()
        .join(",");
    let mut rx = Receiver::start_with(&rc);
    rx.wait_connected(6);
    let lb = Haproxy::start(
        &haproxy,
        &[
            (fleet[0].gw.addr, "send-proxy"),
            (fleet[1].gw.addr, "send-proxy-v2"),
            (fleet[2].gw.addr, "send-proxy-v2"),
        ],
    );

    // 1. The client address HAProxy passes (127.0.0.5) reaches the app's
    //    X-Forwarded-For and the access log of the gateway that served it.
    for i in 0..3 {
        let path = format!("/alice/xff/{i}");
        let r = client::Conn::connect_from(lb.addr, "127.0.0.5".parse().unwrap()).request(
            "GET",
            &path,
            &[],
            b"",
        );
        assert_eq!(r.status, 200, "{path} through HAProxy: {}", r.summary());
        let seen = &app.requests_to(&path)[0];
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("127.0.0.5"),
            "{seen:?}"
        );
    }
    let mut access = Vec::new();
    wait_until("three access lines with client 127.0.0.5", WAIT, || {
        for m in fleet.iter_mut() {
            access.extend(m.gw.proc.stdout_so_far());
        }
        access
            .iter()
            .filter(|l| l.contains("/alice/xff/") && l.contains("\"client\":\"127.0.0.5:"))
            .count()
            == 3
    });

    // 2. A route added with `anp-proxy routes add` is served by all three.
    let out = common::procs::run([
        "routes",
        "add",
        "alice",
        "/added",
        "--config",
        fleet[0].gw.config_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "routes add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, m) in fleet.iter().enumerate() {
        wait_until(&format!("gateway {i} serving /added"), WAIT, || {
            direct(m.gw.addr, "/added/x").status == 200
        });
    }

    // 3. A DID header accepted by one gateway is refused by another.
    let signer = anp_proxy::auth::didwba::DidSigner::load(
        &t.join("k/did.json"),
        &t.join("k/key-1_private.pem"),
    )
    .unwrap();
    let now = anp_proxy::auth::didwba::time::now_unix();
    let header = signer.didwba_header(
        "127.0.0.1",
        &anp_proxy::auth::didwba::sign::fresh_nonce(),
        &anp_proxy::auth::didwba::time::format_utc(now),
    );
    assert_eq!(
        upgrade(fleet[0].tunnel, &header).0,
        101,
        "gateway 1 accepts"
    );
    let (status, body) = upgrade(fleet[2].tunnel, &header);
    assert_eq!(status, 401, "gateway 3 refuses the replay: {body}");
    assert!(body.contains("nonce_replayed"), "{body}");

    // 4. SIGKILL of one gateway: only its requests in flight fail.
    //    Three held requests, one at a time, go round-robin to the three.
    let mut held = Vec::new();
    for i in 0..3 {
        let name = format!("held-{i}");
        let addr = lb.addr;
        let n = name.clone();
        held.push(std::thread::spawn(move || {
            client::try_request(
                addr,
                "GET",
                &format!("/alice/{n}"),
                &[("X-Test-Hold", &n)],
                b"",
            )
        }));
        app.wait_arrived(&name);
    }
    // Client threads keep asking through HAProxy, fresh connections.
    let (tally, stop, loops) = client_loops(lb.addr, "loop");
    wait_until("client threads served", WAIT, || {
        tally.ok.load(Ordering::Relaxed) >= 20
    });
    fleet[1].gw.kill();
    // The port may still complete handshakes for a moment after the
    // process is gone: the kernel releases a listener that io_uring holds
    // (a pending accept) only when it tears the ring down, after the exit.
    // Connections made in that window are reset like those in flight.
    let victim = fleet[1].gw.addr;
    wait_until("the killed gateway's port refusing", WAIT, || {
        std::net::TcpStream::connect(victim).is_err()
    });
    let killed = Instant::now();
    let before = tally.ok.load(Ordering::Relaxed);
    wait_until(
        "clients served by the two others after the kill",
        WAIT,
        || tally.ok.load(Ordering::Relaxed) >= before + 100,
    );
    for i in 0..3 {
        app.release(&format!("held-{i}"));
    }
    let outcomes: Vec<bool> = held
        .into_iter()
        .map(|h| matches!(h.join().unwrap(), Ok(r) if r.status == 200))
        .collect();
    assert_eq!(
        outcomes.iter().filter(|ok| !**ok).count(),
        1,
        "exactly the held request on the killed gateway fails: {outcomes:?}"
    );
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    let failed = tally.failed.lock().unwrap();
    // Only requests on their way while the gateway died fail: none that
    // started once its port was gone.
    assert!(
        failed.iter().all(|(began, _)| *began < killed),
        "a request that started after the kill failed: {failed:?}"
    );
    eprintln!(
        "fleet: {} ok, {} failed in flight at the kill",
        tally.ok.load(Ordering::Relaxed),
        failed.len()
    );
}

// ------------------------------------------ rolling restart with manage.sh

#[test]
fn manage_sh_restart_of_each_gateway_in_turn_fails_nothing() {
    let Some(haproxy) = haproxy_bin() else { return };
    let app = App::start();
    let base = |port: u16, tunnel: u16| GatewayConfig {
        port,
        workers: 1,
        extra_gateway_toml: format!("proxy_protocol = true\ntunnel_port = {tunnel}\n"),
        ..GatewayConfig::default()
    };
    // Started on ports 0; the config then names the ports they got, for
    // the successor to take over.
    let fleet: Vec<(Managed, SocketAddr, SocketAddr)> = (0..3)
        .map(|_| {
            let m = Managed::new(&base(0, 0).to_toml());
            m.run(&["start", "gateway"]);
            let public = m.addr_after("anp-proxy gateway listening on ");
            let tunnel = m.addr_after("anp-proxy gateway tunnels on ");
            std::fs::write(m.config(), base(public.port(), tunnel.port()).to_toml()).unwrap();
            (m, public, tunnel)
        })
        .collect();
    let mut rc = ReceiverConfig::new(fleet[0].2, app.addr, ALICE_TOKEN, 2);
    rc.gateway_url = fleet
        .iter()
        .map(|(_, _, t)| format!("ws://{t}/ws"))
        .collect::<Vec<_>>()
        .join(",");
    let mut rx = Receiver::start_with(&rc);
    rx.wait_connected(6);
    let lb = Haproxy::start(
        &haproxy,
        &[
            (fleet[0].1, "send-proxy-v2"),
            (fleet[1].1, "send-proxy"),
            (fleet[2].1, "send-proxy-v2"),
        ],
    );
    let (tally, stop, loops) = client_loops(lb.addr, "rolling");
    let more = |n: usize, what: &str| {
        let from = tally.ok.load(Ordering::Relaxed);
        wait_until(what, WAIT, || tally.ok.load(Ordering::Relaxed) >= from + n);
    };
    more(50, "requests through the fleet");
    for (i, (m, _, _)) in fleet.iter().enumerate() {
        m.run(&["restart", "gateway"]);
        // Its tunnels came back to the successor before the next one goes.
        rx.wait_connected(6 + 2 * (i + 1));
        more(50, &format!("requests after restarting gateway {i}"));
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    let failed = tally.failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "rolling restart: {} ok, {} failed: {:?}",
        tally.ok.load(Ordering::Relaxed),
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    for (m, _, _) in &fleet {
        m.run(&["stop", "gateway"]);
    }
}
