//! TLS end to end on the real binary (DESIGN.md, "TLS"; issue #3 item 4):
//! an HTTPS request through a WSS tunnel; a receiver that does not trust
//! the gateway's certificate never connects; `verify_mode = "required"`
//! refuses a receiver without a client certificate and admits one signed
//! by the CA, while public clients on the other port need none. SIGHUP
//! swaps the certificate for new connections while open ones keep theirs,
//! a key that does not load changes nothing, and a reload never leaves a
//! TLS port speaking plain TCP. A receiver whose `ca_file` is the
//! gateway's own self-signed certificate connects; another self-signed
//! certificate for the same names is refused; plain HTTP sent to a TLS
//! port is answered with a 400 that says so (issue #16 item 11). Every TLS
//! record the gateway sends fits one 16 KiB write.
//!
//! A throwaway PKI is made per test with rcgen. Ports are 0; readiness and
//! refusals are read from the processes' stdout and stderr; no sleeps (the
//! timeouts below only bound a failing test).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use common::procs::{addr_in, Gateway, Receiver};
use common::App;

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "tls-test-token-1";

// ---- a throwaway PKI ------------------------------------------------------

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// Writes `NAME.pem` (the CA) into `dir`.
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.pem"));
        std::fs::write(&p, self.cert.pem()).unwrap();
        p
    }

    /// Issues a leaf for `sans` with `eku`; writes NAME.crt / NAME.key.
    fn issue(
        &self,
        dir: &Path,
        name: &str,
        sans: &[&str],
        eku: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    client: (PathBuf, PathBuf),
    /// Another CA: its root trusts nothing the gateway has.
    other_ca: PathBuf,
    /// A client certificate from the other CA.
    stranger: (PathBuf, PathBuf),
    /// A server certificate from the other CA (for the reload test).
    server_b: (PathBuf, PathBuf),
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("anp-proxy test CA");
    let other = Ca::new("someone else's CA");
    // The gateway's configs name these by relative path (resolved from
    // the config file's directory).
    ca.issue(
        d,
        "server",
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    Pki {
        ca: ca.write(d, "ca"),
        client: ca.issue(
            d,
            "client",
            &["receiver.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        other_ca: other.write(d, "other-ca"),
        stranger: other.issue(
            d,
            "stranger",
            &["receiver.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        server_b: other.issue(
            d,
            "server-b",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        dir,
    }
}

// ---- configs ----------------------------------------------------------------

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// HTTPS (and WSS) on the public port with the test PKI's server certificate.
const TLS_TABLE: &str =
    "[gateway.tls]\nenabled = true\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n";

/// `[gateway]` with one token identity owning `/svc`, one worker, TLS as
/// given in `extra` (whole tables).
fn gateway_config(extra: &str) -> String {
    format!(
        "[gateway]\nhost = \"127.0.0.1\"\nport = 0\nworkers = 1\n{extra}\n\
         [[gateway.auth.tokens]]\nname = \"svc\"\ntoken = \"{TOKEN}\"\npaths = [\"/svc\"]\n"
    )
}

fn receiver_config(url: &str, upstream: &str, extra: &str) -> String {
    format!(
        "[receiver]\ngateway_url = \"{url}\"\nupstream = \"{upstream}\"\ntoken = \"{TOKEN}\"\n\
         tunnels = 1\nreconnect_max_delay = 0.5\n{extra}\n"
    )
}

/// [`receiver_config`] for `wss://TUNNEL/ws`, trusting `ca`.
fn wss_receiver_config(tunnel: SocketAddr, upstream: &str, ca: &Path) -> String {
    receiver_config(
        &format!("wss://{tunnel}/ws"),
        upstream,
        &format!("ca_file = \"{}\"", toml_path(ca)),
    )
}

fn toml_path(p: &Path) -> String {
    p.display().to_string().replace('\\', "/")
}

// ---- the app behind the receiver ------------------------------------------

/// The test app, answering every request with `app saw METHOD PATH` (and
/// `with N bytes` when it had a body), or [`big_body`] for a target with
/// `big` in it.
fn app() -> App {
    App::saying(|r| {
        let target = r.target_text();
        if target.contains("big") {
            // Large enough to span many TLS records and ANPX chunks.
            big_body().into_bytes()
        } else if r.body_len > 0 {
            format!("app saw {} {target} with {} bytes", r.method, r.body_len).into_bytes()
        } else {
            format!("app saw {} {target}", r.method).into_bytes()
        }
    })
}

/// An HTTPS gateway (one worker) with [`app`] behind one receiver on a
/// `wss://` tunnel, connected.
fn https_with_a_wss_tunnel(pki: &Pki) -> (Gateway, Receiver, App) {
    let d = pki.dir.path();
    let gw = https_gateway(&write_config(d, "gateway.toml", &gateway_config(TLS_TABLE)));
    let app = app();
    let rx_cfg = write_config(
        d,
        "receiver.toml",
        &wss_receiver_config(gw.addr, &upstream(&app), &pki.ca),
    );
    let mut rx = Receiver::start_file(&rx_cfg);
    rx.proc.wait_stdout("connected to");
    (gw, rx, app)
}

/// `http://ADDR` of `app`, for `upstream`.
fn upstream(app: &App) -> String {
    format!("http://{}", app.addr)
}

/// A gateway from `config`, checked to listen on `https://`.
fn https_gateway(config: &Path) -> Gateway {
    let gw = Gateway::start_file(config);
    assert!(
        gw.listening
            .starts_with("anp-proxy gateway listening on https://"),
        "{}",
        gw.listening
    );
    gw
}

fn big_body() -> String {
    (0..200_000).map(|i| format!("{:09}\n", i)).collect()
}

// ---- an HTTPS client that trusts the test CA ------------------------------

fn https_agent(ca: &Path, client: Option<&(PathBuf, PathBuf)>) -> ureq::Agent {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let cfg = match client {
        None => b.with_no_client_auth(),
        Some((c, k)) => {
            let certs = CertificateDer::pem_file_iter(c)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            b.with_client_auth_cert(certs, PrivateKeyDer::from_pem_file(k).unwrap())
                .unwrap()
        }
    };
    ureq::AgentBuilder::new()
        .tls_config(Arc::new(cfg))
        .timeout(WAIT)
        .build()
}

fn get(agent: &ureq::Agent, url: &str) -> (u16, String) {
    match agent.get(url).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

// ---- a raw TLS connection that shows the server's certificate -------------

/// One keep-alive HTTPS connection on rustls directly, so a test can see
/// which certificate its session got and reuse it across a reload.
struct TlsConn {
    s: rustls::StreamOwned<rustls::ClientConnection, Tee>,
}

/// The client's socket, keeping every byte the server sent (its TLS
/// records, as they crossed the wire).
struct Tee {
    tcp: TcpStream,
    seen: Vec<u8>,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.tcp.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

impl TlsConn {
    /// Connects to `addr` trusting only `ca` and completes the handshake;
    /// the handshake's TLS error if it fails.
    fn connect(addr: SocketAddr, ca: &Path) -> Result<TlsConn, rustls::Error> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        tcp.set_write_timeout(Some(WAIT)).unwrap();
        let name = ServerName::from(addr.ip());
        let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let tee = Tee {
            tcp,
            seen: Vec::new(),
        };
        let mut s = rustls::StreamOwned::new(conn, tee);
        while s.conn.is_handshaking() {
            if let Err(e) = s.conn.complete_io(&mut s.sock) {
                let what = format!("{e}");
                return Err(
                    match e.into_inner().map(|i| i.downcast::<rustls::Error>()) {
                        Some(Ok(tls)) => *tls,
                        _ => panic!("TLS handshake with {addr}: not a TLS error: {what}"),
                    },
                );
            }
        }
        Ok(TlsConn { s })
    }

    /// The DER of the leaf certificate the server presented.
    fn peer_cert(&self) -> Vec<u8> {
        self.s
            .conn
            .peer_certificates()
            .expect("a server certificate")[0]
            .to_vec()
    }

    /// GET `path` on this connection (keep-alive): status and body.
    fn get(&mut self, path: &str) -> (u16, String) {
        self.get_with(path, "")
    }

    /// GET `path` asking the gateway to close after it.
    fn get_closing(&mut self, path: &str) -> (u16, String) {
        self.get_with(path, "connection: close\r\n")
    }

    fn get_with(&mut self, path: &str, fields: &str) -> (u16, String) {
        let req = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{fields}\r\n");
        self.s.write_all(req.as_bytes()).unwrap();
        self.s.flush().unwrap();
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            let n = self.s.read(&mut byte).unwrap();
            assert_eq!(n, 1, "connection closed in a response head: {buf:?}");
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap();
        let status = head[9..12].parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no content-length in {head}"));
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).unwrap();
        (status, String::from_utf8(body).unwrap())
    }
}

/// The DER of the first certificate in a PEM file.
fn cert_der(pem: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

fn is_unknown_issuer(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
    )
}

// ---- the tests --------------------------------------------------------------

#[test]
fn https_request_through_a_wss_tunnel() {
    let pki = pki();
    let d = pki.dir.path();
    // Two workers and two tunnels: a TLS tunnel stays on the core that
    // accepted it, so requests reach it from the other core too.
    let gw_cfg = write_config(
        d,
        "gateway.toml",
        &gateway_config(TLS_TABLE).replace("workers = 1", "workers = 2"),
    );
    let mut gw = Gateway::start_file(&gw_cfg);
    let ready = &gw.listening;
    assert!(
        ready.starts_with("anp-proxy gateway listening on https://127.0.0.1:")
            && ready.ends_with("(tunnel path /ws, 2 workers)"),
        "{ready}"
    );
    let addr = gw.addr;

    let app = app();
    let rx_cfg = write_config(
        d,
        "receiver.toml",
        &wss_receiver_config(addr, &upstream(&app), &pki.ca).replace("tunnels = 1", "tunnels = 2"),
    );
    let mut rx = Receiver::start_file(&rx_cfg);
    // Both tunnels, in whichever order they come up.
    let mut up = [false; 2];
    while !up.iter().all(|u| *u) {
        let line = rx.proc.wait_stdout("connected to");
        assert!(line.ends_with(&format!("wss://{addr}/ws")), "{line}");
        for (i, u) in up.iter_mut().enumerate() {
            *u |= line.starts_with(&format!("anp-proxy receiver tunnel {i} connected to"));
        }
    }

    let agent = https_agent(&pki.ca, None);
    let (status, body) = get(&agent, &format!("https://{addr}/svc/hello?x=1"));
    assert_eq!((status, body.as_str()), (200, "app saw GET /svc/hello?x=1"));
    // Keep-alive over the same TLS session, and a path nobody owns.
    let (status, body) = get(&agent, &format!("https://{addr}/svc/again"));
    assert_eq!((status, body.as_str()), (200, "app saw GET /svc/again"));
    let (status, _) = get(&agent, &format!("https://{addr}/nobody"));
    assert_eq!(status, 404);
    // A connection the gateway closes ends with close_notify (RFC 8446
    // §6.1): a clean end of stream, not a truncation (OpenSSL 3 clients
    // report "unexpected eof", and `ab` counted every such answer failed).
    let mut c = TlsConn::connect(addr, &pki.ca).expect("TLS client");
    let (status, body) = c.get_closing("/svc/last");
    assert_eq!((status, body.as_str()), (200, "app saw GET /svc/last"));
    let mut rest = [0u8; 1];
    match c.s.read(&mut rest) {
        Ok(0) => {}
        other => panic!("expected the gateway's close_notify and a clean end, got {other:?}"),
    }
    // Big bodies both ways: the split TLS stream reads and writes at once.
    let upload = vec![b'u'; 3 * 1024 * 1024 + 17];
    let r = agent
        .post(&format!("https://{addr}/svc/upload"))
        .send_bytes(&upload)
        .unwrap();
    assert_eq!(
        r.into_string().unwrap(),
        format!("app saw POST /svc/upload with {} bytes", upload.len())
    );
    let (status, body) = get(&agent, &format!("https://{addr}/svc/big"));
    assert_eq!(status, 200);
    assert!(
        body == big_body(),
        "big response differs ({} bytes)",
        body.len()
    );
    // Concurrent clients share the one tunnel.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let agent = https_agent(&pki.ca, None);
            std::thread::spawn(move || {
                for i in 0..5 {
                    let (status, body) = get(&agent, &format!("https://{addr}/svc/c{t}/{i}"));
                    assert_eq!((status, body), (200, format!("app saw GET /svc/c{t}/{i}")));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Plain HTTP on the TLS port is not served.
    let mut plain = TcpStream::connect(addr).unwrap();
    plain.set_read_timeout(Some(WAIT)).unwrap();
    plain
        .write_all(b"GET /svc/hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(!got.starts_with(b"HTTP/1.1 200"), "plain HTTP was served");
    gw.proc.wait_log(&["plain HTTP on a TLS port"]);
}

/// Every TLS record the gateway sends fits the 16 KiB buffer its TLS
/// stream copies records into and writes from (`tls::MAX_RECORD`). At
/// rustls's default record size (16,406 bytes in all) each full record
/// went out as two sends, its last 22 bytes alone in a TCP segment: 9.4
/// sends for a 64 KiB HTTPS response, where one per record makes 6.4.
#[test]
fn https_records_each_fit_one_16k_write() {
    let pki = pki();
    let (gw, _rx, _app) = https_with_a_wss_tunnel(&pki);
    let addr = gw.addr;
    let mut c = TlsConn::connect(addr, &pki.ca).expect("TLS client");
    let (status, body) = c.get("/svc/big");
    assert_eq!(status, 200);
    assert!(
        body == big_body(),
        "big response differs ({} bytes)",
        body.len()
    );
    // What crossed the wire, record by record: a 5-byte header (type,
    // version, length), then the record's length in bytes.
    let seen = &c.s.sock.seen;
    let mut sizes = Vec::new();
    let mut at = 0;
    while at + 5 <= seen.len() {
        let len = u16::from_be_bytes([seen[at + 3], seen[at + 4]]) as usize;
        sizes.push(5 + len);
        at += 5 + len;
    }
    assert_eq!(at, seen.len(), "the server's bytes end on a record's end");
    let biggest = *sizes.iter().max().unwrap();
    assert!(
        biggest <= 16 * 1024,
        "a {biggest}-byte record does not fit one 16 KiB write ({} records)",
        sizes.len()
    );
    // Full records, not small ones: 2 MB took about 16 KiB each.
    assert!(
        biggest > 16 * 1024 - 64 && sizes.len() < 2 * big_body().len() / (16 * 1024),
        "records of up to {biggest} bytes, {} of them",
        sizes.len()
    );
}

/// Streamed responses over HTTPS arrive whole and in order, chunked (the
/// app's uneven chunks, re-chunked by the gateway when large: chunk lines
/// and CRLFs packed into records with body bytes, `net::Writev::send_packed`)
/// and with a Content-Length, on one keep-alive session.
#[test]
fn streamed_responses_over_https_arrive_whole() {
    let pki = pki();
    let (gw, _rx, _app) = https_with_a_wss_tunnel(&pki);
    let addr = gw.addr;
    let agent = https_agent(&pki.ca, None);
    for (chunked, len) in [("1", 3_000_017), ("0", 1_000_003), ("1", 5_000), ("1", 0)] {
        let r = agent
            .get(&format!("https://{addr}/svc/stream"))
            .set("x-test-chunked", chunked)
            .set("x-test-body-len", &len.to_string())
            .call()
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut body = Vec::new();
        r.into_reader().read_to_end(&mut body).unwrap();
        assert!(
            body == common::app::pattern_body(len),
            "{len}-byte body, chunked {chunked}: got {} bytes",
            body.len()
        );
    }
}

#[test]
fn plain_http_to_a_tls_port_is_told_to_use_https() {
    let pki = pki();
    let d = pki.dir.path();
    let gw_cfg = write_config(d, "gateway.toml", &gateway_config(TLS_TABLE));
    let mut gw = Gateway::start_file(&gw_cfg);
    let addr = gw.addr;
    // `curl http://` to an HTTPS port: a plain-text answer it can read,
    // then the connection closes (read_to_end returns).
    let mut plain = TcpStream::connect(addr).unwrap();
    plain.set_read_timeout(Some(WAIT)).unwrap();
    plain
        .write_all(b"GET /svc/hello HTTP/1.1\r\nhost: x\r\nuser-agent: curl\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    plain.read_to_end(&mut got).expect("an answer, then EOF");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.contains("this port speaks HTTPS"), "{text}");
    gw.proc.wait_log(&["plain HTTP on a TLS port"]);
    // The port still speaks TLS to everyone else.
    let (status, _) = get(
        &https_agent(&pki.ca, None),
        &format!("https://{addr}/nobody"),
    );
    assert_eq!(status, 404);
}

/// A self-signed certificate as `openssl req -x509 -newkey rsa:2048 -nodes
/// -subj /CN=localhost -addext subjectAltName=…` makes it: its own issuer,
/// `CA:TRUE`, the names in subjectAltName. Writes NAME.crt / NAME.key.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "localhost");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[test]
fn a_receiver_trusts_the_gateways_self_signed_certificate_as_its_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (gw_crt, _) = self_signed(d, "gw");
    let (stranger, _) = self_signed(d, "stranger");
    // TLS on the tunnel port only, so a plain client checks the data path.
    let gw_cfg = write_config(
        d,
        "gateway.toml",
        &gateway_config(
            "tunnel_port = 0\n[gateway.tunnel_tls]\nenabled = true\ncert_file = \"gw.crt\"\nkey_file = \"gw.key\"\n",
        ),
    );
    let mut gw = Gateway::start_file(&gw_cfg);
    let public = gw.addr;
    let tunnel = addr_in(&gw.proc.wait_stdout("anp-proxy gateway tunnels on wss://"));
    let app = app();

    // Another self-signed certificate for the same names: not trusted.
    let cfg = write_config(
        d,
        "rx-stranger.toml",
        &wss_receiver_config(tunnel, &upstream(&app), &stranger),
    );
    let mut wrong = Receiver::start_file(&cfg);
    wrong
        .proc
        .wait_log(&["tunnel down", "gateway certificate not trusted"]);
    assert!(wrong
        .proc
        .stdout_so_far()
        .iter()
        .all(|l| !l.contains(" connected to ")));
    drop(wrong);

    // The gateway's own certificate as ca_file: the tunnel comes up.
    let cfg = write_config(
        d,
        "rx.toml",
        &wss_receiver_config(tunnel, &upstream(&app), &gw_crt),
    );
    let mut rx = Receiver::start_file(&cfg);
    let line = rx.proc.wait_stdout("connected to");
    assert!(line.ends_with(&format!("wss://{tunnel}/ws")), "{line}");
    let mut c = TcpStream::connect(public).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"GET /svc/self-signed HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("app saw GET /svc/self-signed"), "{got}");
}

#[test]
fn receiver_refuses_a_gateway_certificate_it_does_not_trust() {
    let pki = pki();
    let d = pki.dir.path();
    let gw_cfg = write_config(d, "gateway.toml", &gateway_config(TLS_TABLE));
    let mut gw = https_gateway(&gw_cfg);
    let addr = gw.addr;
    let rx_cfg = write_config(
        d,
        "receiver.toml",
        &wss_receiver_config(addr, &upstream(&app()), &pki.other_ca),
    );
    let mut rx = Receiver::start_file(&rx_cfg);
    let line = rx
        .proc
        .wait_log(&["tunnel down", "gateway certificate not trusted"]);
    assert!(line.contains("UnknownIssuer"), "{line}");
    // It retries with backoff, and fails the same way again.
    rx.proc.wait_log(&["reconnecting"]);
    rx.proc.wait_log(&["gateway certificate not trusted"]);
    assert!(
        rx.proc
            .stdout_so_far()
            .iter()
            .all(|l| !l.contains(" connected to ")),
        "the receiver must not connect"
    );
    // The gateway saw the client's alert.
    gw.proc.wait_log(&["TLS handshake failed"]);
}

#[test]
fn required_client_certificates_on_the_tunnel_port_only() {
    let pki = pki();
    let d = pki.dir.path();
    let gw_cfg = write_config(
        d,
        "gateway.toml",
        &gateway_config(
            "tunnel_port = 0\n\
             [gateway.tls]\nenabled = true\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n\
             [gateway.tunnel_tls]\nenabled = true\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n\
             ca_file = \"ca.pem\"\nverify_mode = \"required\"\n",
        ),
    );
    let mut gw = https_gateway(&gw_cfg);
    let public = gw.addr;
    let tline = gw.proc.wait_stdout("anp-proxy gateway tunnels on");
    assert!(
        tline.starts_with("anp-proxy gateway tunnels on wss://127.0.0.1:")
            && tline.ends_with("/ws"),
        "{tline}"
    );
    let tunnel = addr_in(&tline);
    assert_ne!(public, tunnel);
    let app = app();
    let upstream = upstream(&app);
    let ca = format!("ca_file = \"{}\"\n", toml_path(&pki.ca));

    // No client certificate: refused in the handshake, retried, never up.
    let cfg = write_config(
        d,
        "rx-nocert.toml",
        &receiver_config(&format!("wss://{tunnel}/ws"), &upstream, &ca),
    );
    let mut nocert = Receiver::start_file(&cfg);
    let l = nocert
        .proc
        .wait_log(&["tunnel down", "CertificateRequired"]);
    assert!(l.contains("gateway refused our client certificate"), "{l}");
    gw.proc
        .wait_log(&["TLS handshake failed", "peer sent no certificates"]);
    assert!(nocert
        .proc
        .stdout_so_far()
        .iter()
        .all(|l| !l.contains(" connected to ")));
    drop(nocert);

    // A certificate from another CA: refused too.
    let cfg = write_config(
        d,
        "rx-stranger.toml",
        &receiver_config(
            &format!("wss://{tunnel}/ws"),
            &upstream,
            &format!(
                "{ca}cert_file = \"{}\"\nkey_file = \"{}\"\n",
                toml_path(&pki.stranger.0),
                toml_path(&pki.stranger.1)
            ),
        ),
    );
    let mut stranger = Receiver::start_file(&cfg);
    stranger.proc.wait_log(&[
        "tunnel down",
        "gateway refused our client certificate",
        "UnknownCA",
    ]);
    gw.proc.wait_log(&["TLS handshake failed", "UnknownIssuer"]);
    assert!(stranger
        .proc
        .stdout_so_far()
        .iter()
        .all(|l| !l.contains(" connected to ")));
    drop(stranger);

    // The public port takes no tunnels when a tunnel port exists, even
    // from a receiver with a good certificate.
    let with_cert = format!(
        "{ca}cert_file = \"{}\"\nkey_file = \"{}\"\n",
        toml_path(&pki.client.0),
        toml_path(&pki.client.1)
    );
    let cfg = write_config(
        d,
        "rx-public.toml",
        &receiver_config(&format!("wss://{public}/ws"), &upstream, &with_cert),
    );
    let mut wrong_port = Receiver::start_file(&cfg);
    wrong_port.proc.wait_log(&["tunnel refused", "501"]);
    assert!(wrong_port
        .proc
        .stdout_so_far()
        .iter()
        .all(|l| !l.contains(" connected to ")));
    drop(wrong_port);

    // A certificate signed by the CA: connected (token auth on top).
    let cfg = write_config(
        d,
        "rx-cert.toml",
        &receiver_config(&format!("wss://{tunnel}/ws"), &upstream, &with_cert),
    );
    let mut rx = Receiver::start_file(&cfg);
    rx.proc.wait_stdout(&format!(
        "anp-proxy receiver tunnel 0 connected to wss://{tunnel}/ws"
    ));

    // Public clients need no certificate on the public port.
    let agent = https_agent(&pki.ca, None);
    let (status, body) = get(&agent, &format!("https://{public}/svc/x"));
    assert_eq!((status, body.as_str()), (200, "app saw GET /svc/x"));
    // The tunnel port serves nothing but tunnels.
    let agent = https_agent(&pki.ca, Some(&pki.client));
    let (status, _) = get(&agent, &format!("https://{tunnel}/svc/x"));
    assert_eq!(status, 404);
}

#[test]
fn required_on_the_main_port_with_the_reference_key_and_a_wrong_token() {
    let pki = pki();
    let d = pki.dir.path();
    let gw_cfg = write_config(
        d,
        "gateway.toml",
        &gateway_config(
            "[gateway.tls]\nenabled = true\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n\
             ca_file = \"ca.pem\"\ntls_verify_mode = \"required\"\n",
        ),
    );
    let gw = https_gateway(&gw_cfg);
    let addr = gw.addr;
    let app = app();
    let upstream = upstream(&app);
    let with_cert = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        toml_path(&pki.ca),
        toml_path(&pki.client.0),
        toml_path(&pki.client.1)
    );
    // A good certificate does not replace the token: a wrong one is refused.
    let bad_token = receiver_config(&format!("wss://{addr}/ws"), &upstream, &with_cert)
        .replace(TOKEN, "not-the-token-9");
    let cfg = write_config(d, "rx-badtoken.toml", &bad_token);
    let mut bad = Receiver::start_file(&cfg);
    bad.proc.wait_log(&["tunnel refused", "401"]);
    drop(bad);

    let cfg = write_config(
        d,
        "rx.toml",
        &receiver_config(&format!("wss://{addr}/ws"), &upstream, &with_cert),
    );
    let mut rx = Receiver::start_file(&cfg);
    rx.proc
        .wait_stdout("anp-proxy receiver tunnel 0 connected to wss://");
    let agent = https_agent(&pki.ca, Some(&pki.client));
    let (status, body) = get(&agent, &format!("https://{addr}/svc/y"));
    assert_eq!((status, body.as_str()), (200, "app saw GET /svc/y"));
}

/// SIGHUP swaps the certificate for new connections only: a session opened
/// before keeps its certificate and keeps serving; a reload whose key does
/// not load changes nothing.
#[test]
fn sighup_reloads_the_certificate_without_dropping_connections() {
    let pki = pki();
    let d = pki.dir.path();
    // Two workers: every core must take the new certificate.
    let gw_cfg = write_config(
        d,
        "gateway.toml",
        &gateway_config(TLS_TABLE).replace("workers = 1", "workers = 2"),
    );
    let mut gw = https_gateway(&gw_cfg);
    let addr = gw.addr;
    let rx_cfg = write_config(
        d,
        "receiver.toml",
        &wss_receiver_config(addr, &upstream(&app()), &pki.ca),
    );
    let mut rx = Receiver::start_file(&rx_cfg);
    rx.proc.wait_stdout(&format!(
        "anp-proxy receiver tunnel 0 connected to wss://{addr}/ws"
    ));

    let (crt, key) = (d.join("server.crt"), d.join("server.key"));
    let cert_a = cert_der(&crt);
    let cert_b = cert_der(&pki.server_b.0);
    assert_ne!(cert_a, cert_b);

    // Before: certificate A (CA1); a client trusting only CA2 fails.
    let mut c1 = TlsConn::connect(addr, &pki.ca).expect("CA1 client before the reload");
    assert!(c1.peer_cert() == cert_a, "C1 did not get certificate A");
    assert_eq!(
        c1.get("/svc/before"),
        (200, "app saw GET /svc/before".into())
    );
    let e = TlsConn::connect(addr, &pki.other_ca)
        .err()
        .expect("a CA2-only client must fail before the reload");
    assert!(is_unknown_issuer(&e), "{e:?}");

    // Certificate B (CA2) in the files the config names, then SIGHUP.
    std::fs::copy(&pki.server_b.0, &crt).unwrap();
    std::fs::copy(&pki.server_b.1, &key).unwrap();
    gw.signal(libc::SIGHUP);
    let line = gw.proc.wait_stdout("anp-proxy reload");
    assert!(line.starts_with("anp-proxy reloaded "), "{line}");

    // New connections (several, to reach both cores) get B: CA2 clients
    // succeed and serve, CA1 clients fail.
    for i in 0..6 {
        let mut c = TlsConn::connect(addr, &pki.other_ca)
            .unwrap_or_else(|e| panic!("CA2 client {i} after the reload: {e:?}"));
        assert!(c.peer_cert() == cert_b, "new connection {i} did not get B");
        let path = format!("/svc/after/{i}");
        assert_eq!(c.get(&path), (200, format!("app saw GET {path}")));
        let e = TlsConn::connect(addr, &pki.ca)
            .err()
            .expect("a CA1-only client must fail after the reload");
        assert!(is_unknown_issuer(&e), "{e:?}");
    }
    // C1, opened before, is still up on A's session and still serves.
    assert!(c1.peer_cert() == cert_a);
    assert_eq!(
        c1.get("/svc/c1-after"),
        (200, "app saw GET /svc/c1-after".into())
    );

    // A broken key: the reload fails and changes nothing.
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    let line = gw.proc.wait_stdout("anp-proxy reload");
    assert!(line.starts_with("anp-proxy reload failed: "), "{line}");
    assert!(line.contains("gateway.tls.key_file"), "{line}");
    let mut c = TlsConn::connect(addr, &pki.other_ca).expect("CA2 client after a failed reload");
    assert!(
        c.peer_cert() == cert_b,
        "a failed reload changed the certificate"
    );
    assert_eq!(c.get("/svc/kept"), (200, "app saw GET /svc/kept".into()));
    assert!(TlsConn::connect(addr, &pki.ca).is_err());
    assert_eq!(
        c1.get("/svc/c1-last"),
        (200, "app saw GET /svc/c1-last".into())
    );
    // The tunnel (WSS, opened before both reloads) never went down.
    assert!(
        rx.proc
            .stdout_so_far()
            .iter()
            .all(|l| !l.contains(" connected to ")),
        "the receiver reconnected"
    );
}

/// The tunnel port, sharing `[gateway.tls]`, stays TLS through a reload of
/// a file without `tunnel_port` (the listener stays until a restart): the
/// reload is refused, not applied as "no TLS on the tunnel port".
#[test]
fn a_reload_never_turns_the_tunnel_port_to_plain_tcp() {
    let pki = pki();
    let d = pki.dir.path();
    let text = gateway_config(
        "tunnel_port = 0\n\
         [gateway.tls]\nenabled = true\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n",
    );
    let gw_cfg = write_config(d, "gateway.toml", &text);
    let mut gw = https_gateway(&gw_cfg);
    let tunnel = addr_in(&gw.proc.wait_stdout("anp-proxy gateway tunnels on wss://"));
    TlsConn::connect(tunnel, &pki.ca).expect("TLS on the tunnel port");

    std::fs::write(&gw_cfg, text.replace("tunnel_port = 0\n", "")).unwrap();
    gw.signal(libc::SIGHUP);
    let line = gw.proc.wait_stdout("anp-proxy reload");
    assert!(line.starts_with("anp-proxy reload failed: "), "{line}");
    TlsConn::connect(tunnel, &pki.ca).expect("TLS on the tunnel port after the reload");
}
