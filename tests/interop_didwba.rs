//! DID-WBA interop against the real ANP SDKs (agent-connect 0.3.7 and anp
//! 1.0.7, pinned, installed from PyPI into `target/interop-venv` by
//! `tests/interop/setup_venv.sh`): the SDKs' proofs open tunnels on the real
//! gateway binary (101) or are refused with the right status and reason;
//! our receiver's proofs open tunnels that serve the DID's routes, and
//! verify with each SDK's own verifier. Ports are 0; readiness is read from
//! stdout; no sleeps.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use common::procs::{self, Gateway, Receiver};
use common::{client, App};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const WAIT: Duration = Duration::from_secs(30);

fn python() -> &'static Path {
    procs::interop_python()
}

/// Runs `tests/interop/sdk.py ARGS` and returns its JSON answer.
fn sdk(args: &[&str]) -> Value {
    let out = Command::new(python())
        .arg(Path::new(ROOT).join("tests/interop/sdk.py"))
        .args(args)
        .output()
        .expect("run sdk.py");
    assert!(
        out.status.success(),
        "expected sdk.py {args:?} to succeed; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("sdk.py prints JSON")
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Copies `dir/did.json` to where `did_documents_dir` looks for the DID.
fn publish(docs: &Path, did: &str, dir: &Path) {
    let mut parts = did.strip_prefix("did:wba:").unwrap().split(':');
    let mut p = docs.join(parts.next().unwrap());
    for s in parts {
        p.push(s);
    }
    std::fs::create_dir_all(&p).unwrap();
    std::fs::copy(dir.join("did.json"), p.join("did.json")).unwrap();
}

/// Starts a gateway with `auth` as its `[gateway.auth]` body; returns it and its port.
fn gateway(dir: &Path, name: &str, auth: &str) -> (Gateway, u16) {
    let cfg = dir.join(format!("{name}.toml"));
    write(
        &cfg,
        &format!(
            "[gateway]\nhost = \"127.0.0.1\"\nport = 0\nworkers = 1\n[gateway.auth]\n{auth}\n"
        ),
    );
    let gw = Gateway::start_file(&cfg);
    assert!(
        gw.listening
            .starts_with("anp-proxy gateway listening on http://127.0.0.1:"),
        "{}",
        gw.listening
    );
    let port = gw.addr.port();
    (gw, port)
}

fn dids_toml(routes: &[(&str, &str)]) -> String {
    routes
        .iter()
        .map(|(did, path)| {
            format!("[[gateway.auth.dids]]\ndid = \"{did}\"\npaths = [\"{path}\"]\n")
        })
        .collect()
}

/// A raw WebSocket upgrade with `headers`; returns the status and, for a
/// refusal, the JSON body.
fn upgrade(port: u16, host: &str, headers: &Value) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in headers.as_object().unwrap() {
        req.push_str(&format!("{k}: {}\r\n", v.as_str().unwrap()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut len = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    if status == 101 {
        return (status, Value::Null);
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn expect(port: u16, host: &str, headers: &Value, status: u16, reason: &str, what: &str) {
    let (got, body) = upgrade(port, host, headers);
    assert_eq!(
        got, status,
        "{what}: expected {status} {reason}, got {got} {body}"
    );
    if status != 101 {
        assert_eq!(
            body["error"], reason,
            "{what}: expected reason {reason}, body {body}"
        );
    }
}

fn create(sdk_name: &str, profile: &str, path: &str, out: &Path, p256: bool) -> String {
    let o = out.to_str().unwrap();
    let mut args = vec![
        "create",
        "--sdk",
        sdk_name,
        "--profile",
        profile,
        "--host",
        "agents.test",
        "--path",
        path,
        "--out",
        o,
    ];
    if p256 {
        args.push("--p256-auth");
    }
    sdk(&args)["did"].as_str().unwrap().to_owned()
}

fn headers(mode: &str, dir: &Path, key: &str, url: &str, extra: &[&str]) -> Value {
    let doc = dir.join("did.json");
    let key = dir.join(key);
    let mut args = vec![
        "headers",
        "--mode",
        mode,
        "--doc",
        doc.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--url",
        url,
    ];
    args.extend_from_slice(extra);
    sdk(&args)
}

fn flip_signature(h: &Value) -> Value {
    let a = h["Authorization"].as_str().unwrap();
    let i = a.find("signature=\"").unwrap() + 15;
    let mut b = a.as_bytes().to_vec();
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    serde_json::json!({"Authorization": String::from_utf8(b).unwrap()})
}

#[test]
fn sdk_proofs_open_tunnels_or_are_refused_with_their_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let docs = t.join("docs");
    let ac = create("agent-connect", "plain", "agents,ac", &t.join("ac"), false);
    let e1 = create("anp", "e1", "agents,e1", &t.join("e1"), true);
    let k1 = create("anp", "k1", "agents,k1", &t.join("k1"), false);
    let lonely = create(
        "agent-connect",
        "plain",
        "agents,lonely",
        &t.join("lonely"),
        false,
    );
    let absent = create(
        "agent-connect",
        "plain",
        "agents,absent",
        &t.join("absent"),
        false,
    );
    for (did, d) in [(&ac, "ac"), (&e1, "e1"), (&k1, "k1"), (&lonely, "lonely")] {
        publish(&docs, did, &t.join(d));
    }
    let auth = format!(
        "did_documents_dir = \"docs\"\nservice_domains = [\"agents.test\"]\n{}",
        dids_toml(&[
            (&ac, "/ac"),
            (&e1, "/e1"),
            (&k1, "/k1"),
            (&absent, "/absent")
        ])
    );
    let (_gw, port) = gateway(t, "gw", &auth);
    let host = format!("agents.test:{port}");
    let url = format!("ws://agents.test:{port}/ws");
    let u = url.as_str();

    // Accepted: each SDK's own headers for a document it created.
    let ac_h = headers("agent-connect", &t.join("ac"), "key-1_private.pem", u, &[]);
    expect(
        port,
        &host,
        &ac_h,
        101,
        "",
        "agent-connect DIDWba, secp256k1 JWK",
    );
    for (dir, what) in [
        ("e1", "anp e1 (Ed25519 Multikey)"),
        ("k1", "anp k1 (secp256k1 JWK)"),
    ] {
        let d = t.join(dir);
        expect(
            port,
            &host,
            &headers("anp-legacy", &d, "key-1_private.pem", u, &[]),
            101,
            "",
            &format!("{what} legacy_didwba"),
        );
        expect(
            port,
            &host,
            &headers("anp-http", &d, "key-1_private.pem", u, &[]),
            101,
            "",
            &format!("{what} http_signatures"),
        );
    }
    let p256 = headers(
        "anp-http",
        &t.join("e1"),
        "key-2_private.pem",
        u,
        &["--keyid", &format!("{e1}#key-2")],
    );
    expect(
        port,
        &host,
        &p256,
        101,
        "",
        "anp P-256 JWK (key-2) http_signatures",
    );
    let http_url = format!("http://agents.test:{port}/ws");
    let spelt_http = headers(
        "anp-http",
        &t.join("k1"),
        "key-1_private.pem",
        &http_url,
        &[],
    );
    expect(
        port,
        &host,
        &spelt_http,
        101,
        "",
        "target URI spelt http://",
    );

    // Refused, each with its status and reason.
    expect(
        port,
        &host,
        &ac_h,
        401,
        "nonce_replayed",
        "replayed agent-connect header",
    );
    let old = headers(
        "anp-legacy",
        &t.join("k1"),
        "key-1_private.pem",
        u,
        &["--offset", "-400"],
    );
    expect(
        port,
        &host,
        &old,
        401,
        "timestamp_expired",
        "timestamp 400 s old",
    );
    let old_http = headers(
        "anp-http",
        &t.join("e1"),
        "key-1_private.pem",
        u,
        &["--offset", "-400"],
    );
    expect(
        port,
        &host,
        &old_http,
        401,
        "timestamp_expired",
        "created 400 s old",
    );
    let future = headers(
        "anp-legacy",
        &t.join("k1"),
        "key-1_private.pem",
        u,
        &["--offset", "120"],
    );
    expect(
        port,
        &host,
        &future,
        401,
        "timestamp_in_future",
        "timestamp 120 s ahead",
    );
    let wrong_url = format!("ws://wrong.test:{port}/ws");
    let wrong = headers(
        "anp-legacy",
        &t.join("e1"),
        "key-1_private.pem",
        &wrong_url,
        &[],
    );
    expect(
        port,
        &format!("wrong.test:{port}"),
        &wrong,
        401,
        "service_domain_mismatch",
        "proof for wrong.test",
    );
    let signed_elsewhere = headers(
        "agent-connect",
        &t.join("ac"),
        "key-1_private.pem",
        &wrong_url,
        &[],
    );
    expect(
        port,
        &host,
        &signed_elsewhere,
        401,
        "invalid_signature",
        "service wrong.test signed, Host agents.test",
    );
    let tampered = flip_signature(&headers(
        "agent-connect",
        &t.join("ac"),
        "key-1_private.pem",
        u,
        &[],
    ));
    expect(
        port,
        &host,
        &tampered,
        401,
        "invalid_signature",
        "tampered signature",
    );
    let fresh = headers("anp-legacy", &t.join("k1"), "key-1_private.pem", u, &[]);
    let a = fresh["Authorization"].as_str().unwrap().replace(
        "verification_method=\"key-1\"",
        "verification_method=\"key-7\"",
    );
    expect(
        port,
        &host,
        &serde_json::json!({"Authorization": a}),
        401,
        "unknown_verification_method",
        "unknown key fragment",
    );
    let lonely_h = headers(
        "agent-connect",
        &t.join("lonely"),
        "key-1_private.pem",
        u,
        &[],
    );
    expect(
        port,
        &host,
        &lonely_h,
        403,
        "no_routes",
        "DID with no routes",
    );
    let absent_h = headers(
        "agent-connect",
        &t.join("absent"),
        "key-1_private.pem",
        u,
        &[],
    );
    expect(
        port,
        &host,
        &absent_h,
        401,
        "did_document_unavailable",
        "DID whose document is missing",
    );
    let unsigned = serde_json::json!({"X-Auth": "{\"type\":\"authentication\"}"});
    expect(
        port,
        &host,
        &unsigned,
        401,
        "missing_authorization",
        "reference's unsigned authentication",
    );

    // Documents over the network: a local server as resolver_base_url.
    let srv = TcpListener::bind("127.0.0.1:0").unwrap();
    let sport = srv.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in srv.incoming().map_while(Result::ok) {
            let mut r = BufReader::new(s);
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let mut s = r.into_inner();
            if line.contains("/big/") {
                let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(70 * 1024));
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{body}");
            } // anything else: closed without an answer (unreachable)
        }
    });
    let big = create("agent-connect", "plain", "big,x", &t.join("big"), false);
    let gone = create("agent-connect", "plain", "gone,x", &t.join("gone"), false);
    let routes = dids_toml(&[(&big, "/big"), (&gone, "/gone")]);
    let (_gw2, port2) = gateway(
        t,
        "gw2",
        &format!("resolver_base_url = \"http://127.0.0.1:{sport}\"\nallow_private_resolver_targets = true\n{routes}"),
    );
    let (_gw3, port3) = gateway(
        t,
        "gw3",
        &format!("resolver_base_url = \"http://127.0.0.1:{sport}\"\n{routes}"),
    );
    for (p, dir, reason, what) in [
        (
            port2,
            "big",
            "did_document_too_large",
            "document over 64 KiB",
        ),
        (
            port2,
            "gone",
            "did_document_unavailable",
            "server closes without answering",
        ),
        (
            port3,
            "big",
            "did_document_private_address",
            "loopback resolver target not allowed",
        ),
    ] {
        let url = format!("ws://agents.test:{p}/ws");
        let h = headers(
            "agent-connect",
            &t.join(dir),
            "key-1_private.pem",
            &url,
            &[],
        );
        expect(p, &format!("agents.test:{p}"), &h, 401, reason, what);
    }
}

/// The test app, answering every request with `app saw PATH`.
fn app() -> App {
    App::saying(|r| format!("app saw {}", r.target_text()).into_bytes())
}

fn receiver(
    dir: &Path,
    name: &str,
    gateway_url: &str,
    upstream: u16,
    id: &Path,
    scheme: &str,
) -> Receiver {
    let cfg = dir.join(format!("{name}.toml"));
    write(
        &cfg,
        &format!(
            "[receiver]\ngateway_url = \"{gateway_url}\"\nupstream = \"http://127.0.0.1:{upstream}\"\ntunnels = 1\nreconnect_max_delay = 1\ndid_document = \"{}\"\nprivate_key = \"{}\"\nauth_scheme = \"{scheme}\"\n",
            id.join("did.json").display(),
            id.join("key-1_private.pem").display()
        ),
    );
    Receiver::start_file(&cfg)
}

fn did_new(dir: &Path, did: &str, flags: &[&str]) -> String {
    let mut args = vec!["did", "new", did, "--out", dir.to_str().unwrap()];
    args.extend_from_slice(flags);
    let out = procs::run(args);
    assert!(
        out.status.success(),
        "expected `did new` to succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    let headers = [("Host", "127.0.0.1"), ("Connection", "close")];
    let r = client::request(([127, 0, 0, 1], port).into(), "GET", path, &headers, b"");
    (r.status, r.body_text())
}

#[test]
fn our_receiver_proves_its_did_and_serves_its_routes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let docs = t.join("docs");
    let k = did_new(&t.join("k"), "did:wba:agents.test:rx:k", &[]);
    let e = did_new(
        &t.join("e"),
        "did:wba:agents.test:rx",
        &["--ed25519", "--key-bound"],
    );
    assert!(
        e.starts_with("did:wba:agents.test:rx:e1_"),
        "expected a key-bound DID, got {e}"
    );
    publish(&docs, &k, &t.join("k"));
    publish(&docs, &e, &t.join("e"));
    let auth = format!(
        "did_documents_dir = \"docs\"\n{}",
        dids_toml(&[(&k, "/k"), (&e, "/e")])
    );
    let (_gw, port) = gateway(t, "gw", &auth);
    let app = app();
    let upstream = app.addr.port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut rk = receiver(t, "rk", &url, upstream, &t.join("k"), "didwba");
    let mut re = receiver(t, "re", &url, upstream, &t.join("e"), "http-signatures");
    rk.proc
        .wait_stdout("anp-proxy receiver tunnel 0 connected to ws://");
    re.proc
        .wait_stdout("anp-proxy receiver tunnel 0 connected to ws://");
    assert_eq!(
        http_get(port, "/k/hello"),
        (200, "app saw /k/hello".into()),
        "secp256k1 DIDWba tunnel serves /k"
    );
    assert_eq!(
        http_get(port, "/e/x?y=1"),
        (200, "app saw /e/x?y=1".into()),
        "Ed25519 RFC 9421 tunnel serves /e"
    );
}

/// Accepts one upgrade, answers 401, and returns its headers.
fn capture_upgrade(l: &TcpListener) -> serde_json::Map<String, Value> {
    let (s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let mut out = serde_json::Map::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            out.insert(k.trim().to_owned(), Value::from(v.trim()));
        }
    }
    let _ = r
        .get_mut()
        .write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    out
}

#[test]
fn our_proofs_verify_with_each_sdks_own_verifier() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    did_new(&t.join("k"), "did:wba:agents.test:rx:k", &[]);
    did_new(
        &t.join("e"),
        "did:wba:agents.test:rx",
        &["--ed25519", "--key-bound"],
    );
    for (id, scheme, checks) in [
        ("k", "didwba", &["agent_connect", "anp_legacy"][..]),
        ("k", "http-signatures", &["anp_http"][..]),
        ("e", "didwba", &["anp_legacy"][..]),
        ("e", "http-signatures", &["anp_http"][..]),
    ] {
        // A listener per receiver: a killed receiver's reconnect must not
        // be mistaken for the next one's upgrade.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let url = format!("ws://127.0.0.1:{port}/ws");
        let _rx = receiver(t, &format!("{id}-{scheme}"), &url, 9, &t.join(id), scheme);
        let headers = capture_upgrade(&l);
        let doc = t.join(id).join("did.json");
        let v = sdk(&[
            "verify",
            "--doc",
            doc.to_str().unwrap(),
            "--url",
            &url,
            "--domain",
            "127.0.0.1",
            "--headers",
            &Value::Object(headers.clone()).to_string(),
        ]);
        assert_eq!(
            v["anp_binding"], true,
            "{id}/{scheme}: anp accepts the document's binding: {v}"
        );
        for c in checks {
            assert_eq!(
                v[c][0], true,
                "{id}/{scheme}: expected {c} to accept our headers {headers:?}: {v}"
            );
        }
    }
}
