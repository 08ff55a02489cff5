//! The tools that make what a config names (issue #16): `anp-proxy cert
//! new` and `anp-proxy token new`, each followed by the use it is for.
//!
//! - `cert new 127.0.0.1 localhost`: the config lines it prints, pasted
//!   as they are into a gateway's and a receiver's config, give HTTPS and
//!   WSS that verify: a client trusting only the printed `ca.crt` gets
//!   200 through the tunnel; the keys are mode 0600; nothing is ever
//!   overwritten.
//! - `token new alice --path /alice`: the token on stdout, the gateway's
//!   entry on stderr; that entry in a gateway's config and the token in a
//!   receiver's environment give 200.
//!
//! The real binary; ports 0; waits on printed lines.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::procs::{addr_in, binary, run, Proc};
use common::{client, App};

/// `anp-proxy ARGS` in `dir`, which must succeed: (stdout, stderr).
fn tool(dir: &Path, args: &[&str]) -> (String, String) {
    let out = std::process::Command::new(binary())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{args:?}: {}\n{o}\n{e}", out.status);
    (o, e)
}

/// The lines of `printed` from the one equal to `header` to the next
/// blank line: one table as `cert new` printed it.
fn table(printed: &str, header: &str) -> String {
    let mut lines = printed.lines().skip_while(|l| *l != header);
    let mut out = String::new();
    for l in lines.by_ref().take_while(|l| !l.trim().is_empty()) {
        out.push_str(l);
        out.push('\n');
    }
    assert!(!out.is_empty(), "no {header} in:\n{printed}");
    out
}

/// A gateway started from `config` in `dir` (port 0, one worker): its
/// process and public address.
fn gateway(dir: &Path, config: &str) -> (Proc, std::net::SocketAddr) {
    std::fs::write(dir.join("gw.toml"), config).unwrap();
    let path = dir.join("gw.toml");
    let mut gw = Proc::start(
        "gateway",
        binary(),
        ["gateway", "--config", path.to_str().unwrap()],
        &[],
    );
    let line = gw.wait_stdout("anp-proxy gateway listening on ");
    (gw, addr_in(&line))
}

fn wait_tunnel(rx: &mut Proc) {
    rx.wait_line("`anp-proxy receiver tunnel … connected to …`", |l| {
        l.starts_with("anp-proxy receiver tunnel") && l.contains(" connected to ")
    });
}

#[test]
fn cert_new_gives_tls_that_works_with_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (printed, said) = tool(d, &["cert", "new", "127.0.0.1", "localhost"]);
    assert!(
        said.contains("tls/ca.crt") && said.contains("tls/gateway.key"),
        "{said}"
    );
    for key in ["tls/ca.key", "tls/gateway.key"] {
        let mode = std::fs::metadata(d.join(key)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    // Never overwrites.
    let again = run([
        "cert",
        "new",
        "localhost",
        "--out",
        d.join("tls").to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not overwriting"));

    let app = App::start();
    let gw_config = format!(
        "[gateway]\nport = 0\nworkers = 1\n\n{}\n[[gateway.auth.tokens]]\nname = \"alice\"\n\
         token = \"alice-tls-token\"\npaths = [\"/alice\"]\n",
        table(&printed, "[gateway.tls]")
    );
    let (_gw, addr) = gateway(d, &gw_config);
    // The receiver's lines as printed, with the real port; the file sits
    // beside tls/, so the relative paths hold.
    let rx_config = table(&printed, "[receiver]").replace(
        "wss://127.0.0.1:8089/ws",
        &format!("wss://127.0.0.1:{}/ws", addr.port()),
    );
    let rx_config = format!(
        "{rx_config}token = \"alice-tls-token\"\nupstream = \"http://{}\"\ntunnels = 1\n",
        app.addr
    );
    std::fs::write(d.join("rx.toml"), &rx_config).unwrap();
    let rx_path = d.join("rx.toml");
    let mut rx = Proc::start(
        "receiver",
        binary(),
        ["receiver", "--config", rx_path.to_str().unwrap()],
        &[],
    );
    wait_tunnel(&mut rx);

    // A client that trusts only the new CA.
    let (status, _) = https_get(
        &d.join("tls/ca.crt"),
        &format!("https://127.0.0.1:{}/alice/tls", addr.port()),
    );
    assert_eq!(status, 200);
    assert_eq!(app.requests_to("/alice/tls").len(), 1);
}

#[test]
fn cert_new_refuses_what_it_cannot_make() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["cert", "new", "bad name"][..],
        &["cert", "new", "localhost", "--file", "../x"],
    ] {
        let out = std::process::Command::new(binary())
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!dir.path().join("tls").exists(), "{args:?} wrote files");
    }
}

#[test]
fn token_new_gives_a_token_the_gateway_and_receiver_accept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (token, entry) = tool(d, &["token", "new", "alice", "--path", "/alice"]);
    let token = token.trim();
    assert_eq!(token.len(), 43, "{token}");
    let (other, _) = tool(d, &["token", "new", "alice"]);
    assert_ne!(other.trim(), token);
    // The entry as printed, pasted under a [gateway] table.
    let entry = table(&entry, "[[gateway.auth.tokens]]");
    assert!(entry.contains(token), "{entry}");
    let (_gw, addr) = gateway(d, &format!("[gateway]\nport = 0\nworkers = 1\n\n{entry}"));

    let app = App::start();
    let mut rx = Proc::start(
        "receiver",
        binary(),
        [
            "receiver",
            "--gateway-url",
            &format!("ws://{addr}/ws"),
            "--upstream",
            &format!("http://{}", app.addr),
        ],
        &[("ANP_PROXY_RECEIVER__TOKEN".into(), token.into())],
    );
    wait_tunnel(&mut rx);
    let r = client::request(addr, "GET", "/alice/tok", &[], b"");
    assert_eq!(r.status, 200, "{}", r.summary());
}

/// GET `url` trusting only the certificates in `ca`: (status, body).
fn https_get(ca: &Path, url: &str) -> (u16, String) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
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
    let agent = ureq::AgentBuilder::new()
        .tls_config(Arc::new(cfg))
        .timeout(Duration::from_secs(30))
        .build();
    match agent.get(url).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}
