//! `anp-proxy check` against the real starts (issue #16, items 6 and 9):
//! for each configuration a start refuses without touching the network —
//! a certificate, key, CA, DID document or private key that is missing or
//! does not load, a key that does not match its certificate, a DID
//! documents directory that is not there, a `gateway_url` that is not
//! `ws(s)://`, an `upstream` that is not `http(s)://` or `unix:/path`, an
//! `https://` upstream's CA file that is missing — `check` fails too, naming the same
//! key, and the start fails with the same words. `check --print` shows the
//! effective configuration with the secrets masked. Errors are said once;
//! an unknown key gets a "did you mean"; the help of every subcommand
//! describes `--config` as what it is.
//!
//! The real binary, one temporary directory per case; nothing listens
//! (every gateway here binds port 0 and must not even get that far).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::procs::{binary, run_to_end, Finished};
use rcgen::{CertificateParams, DnType, KeyPair};

const TOKEN: &str = "check-test-token-1";

/// A certificate for `localhost`/127.0.0.1 and its key, written as
/// `NAME.crt` / `NAME.key` into `dir`; with `wrong_key`, the key file
/// holds another key than the certificate's.
fn cert(dir: &Path, name: &str, wrong_key: bool) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    let c = p.self_signed(&key).unwrap();
    let written = if wrong_key {
        KeyPair::generate().unwrap()
    } else {
        key
    };
    let (cp, kp) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cp, c.pem()).unwrap();
    std::fs::write(&kp, written.serialize_pem()).unwrap();
    (cp, kp)
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn gateway_toml(extra: &str) -> String {
    format!(
        "[logging]\nlevel = \"info\"\n[gateway]\nhost = \"127.0.0.1\"\nport = 0\nworkers = 1\n{extra}\n\
         [[gateway.auth.tokens]]\nname = \"svc\"\ntoken = \"{TOKEN}\"\npaths = [\"/svc\"]\n"
    )
}

fn receiver_toml(url: &str, upstream: &str, extra: &str) -> String {
    format!(
        "[logging]\nlevel = \"info\"\n[receiver]\ngateway_url = \"{url}\"\nupstream = \"{upstream}\"\n\
         token = \"{TOKEN}\"\ntunnels = 1\n{extra}\n"
    )
}

fn failed_naming(f: &Finished, what: &str, needles: &[&str]) {
    assert!(
        !f.status.success(),
        "{what}: expected a failure, got {}; stdout:\n{}\nstderr:\n{}",
        f.status,
        f.stdout,
        f.stderr
    );
    for n in needles {
        assert!(
            f.stderr.contains(n),
            "{what}: expected {n:?} in stderr:\n{}",
            f.stderr
        );
    }
}

/// `check` and the start (`role`) both refuse `config`, each saying every
/// one of `needles`.
fn check_and_start_refuse(dir: &Path, config: &str, role: &str, needles: &[&str]) {
    let path = write(dir, config);
    let check = run_to_end("check", &[], &path);
    failed_naming(&check, &format!("check of\n{config}"), needles);
    let start = run_to_end(role, &[], &path);
    failed_naming(&start, &format!("{role} start with\n{config}"), needles);
}

#[test]
fn missing_or_mismatched_gateway_tls_files_fail_check_as_they_fail_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    cert(d, "good", false);
    cert(d, "mismatched", true);
    // cert_file missing.
    check_and_start_refuse(
        d,
        &gateway_toml(
            "[gateway.tls]\nenabled = true\ncert_file = \"nope.crt\"\nkey_file = \"good.key\"\n",
        ),
        "gateway",
        &["gateway.tls.cert_file", "nope.crt"],
    );
    // key_file missing.
    check_and_start_refuse(
        d,
        &gateway_toml(
            "[gateway.tls]\nenabled = true\ncert_file = \"good.crt\"\nkey_file = \"nope.key\"\n",
        ),
        "gateway",
        &["gateway.tls.key_file", "nope.key"],
    );
    // A key that is not the certificate's.
    check_and_start_refuse(
        d,
        &gateway_toml(
            "[gateway.tls]\nenabled = true\ncert_file = \"mismatched.crt\"\nkey_file = \"mismatched.key\"\n",
        ),
        "gateway",
        &["gateway.tls.key_file"],
    );
    // A certificate file that holds no certificate.
    std::fs::write(d.join("empty.crt"), "not a certificate\n").unwrap();
    check_and_start_refuse(
        d,
        &gateway_toml(
            "[gateway.tls]\nenabled = true\ncert_file = \"empty.crt\"\nkey_file = \"good.key\"\n",
        ),
        "gateway",
        &["gateway.tls.cert_file", "empty.crt"],
    );
    // The tunnel port's own table, and its CA for client certificates.
    check_and_start_refuse(
        d,
        &gateway_toml(
            "tunnel_port = 0\n[gateway.tunnel_tls]\nenabled = true\ncert_file = \"good.crt\"\nkey_file = \"good.key\"\n\
             ca_file = \"receivers-ca.pem\"\nverify_mode = \"required\"\n",
        ),
        "gateway",
        &["gateway.tunnel_tls.ca_file", "receivers-ca.pem"],
    );
}

#[test]
fn missing_receiver_tls_files_fail_check_as_they_fail_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    cert(d, "client", false);
    cert(d, "odd", true);
    let url = "wss://127.0.0.1:9/ws";
    let up = "http://127.0.0.1:9";
    check_and_start_refuse(
        d,
        &receiver_toml(url, up, "ca_file = \"ca.pem\"\n"),
        "receiver",
        &["receiver.ca_file", "ca.pem"],
    );
    check_and_start_refuse(
        d,
        &receiver_toml(
            url,
            up,
            "ca_file = \"client.crt\"\ncert_file = \"missing.crt\"\nkey_file = \"client.key\"\n",
        ),
        "receiver",
        &["receiver.cert_file", "missing.crt"],
    );
    check_and_start_refuse(
        d,
        &receiver_toml(
            url,
            up,
            "ca_file = \"client.crt\"\ncert_file = \"odd.crt\"\nkey_file = \"odd.key\"\n",
        ),
        "receiver",
        &["receiver.key_file"],
    );
}

#[test]
fn url_schemes_fail_check_as_they_fail_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    check_and_start_refuse(
        d,
        &receiver_toml("http://127.0.0.1:9/ws", "http://127.0.0.1:9", ""),
        "receiver",
        &["receiver.gateway_url", "ws:// or wss://"],
    );
    check_and_start_refuse(
        d,
        &receiver_toml("ws://127.0.0.1:9/ws", "ftp://127.0.0.1:9", ""),
        "receiver",
        &["receiver.upstream", "http:// or https://", "unix:/path"],
    );
    check_and_start_refuse(
        d,
        &receiver_toml("ws://127.0.0.1:9/ws", "unix:app.sock", ""),
        "receiver",
        &["receiver.upstream", "absolute socket path"],
    );
    check_and_start_refuse(
        d,
        &receiver_toml(
            "ws://127.0.0.1:9/ws",
            "https://127.0.0.1:9",
            "upstream_ca_file = \"missing-ca.crt\"",
        ),
        "receiver",
        &["receiver.upstream_ca_file", "missing-ca.crt"],
    );
}

#[test]
fn did_files_fail_check_as_they_fail_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Two identities made by `anp-proxy did new`; a document with the
    // other one's key matches nothing.
    for (did, out) in [
        ("did:wba:example.com:agents:alice", "alice"),
        ("did:wba:example.com:agents:bob", "bob"),
    ] {
        let o = Command::new(binary())
            .args(["did", "new", did, "--out"])
            .arg(d.join(out))
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
    }
    let (url, up) = ("ws://127.0.0.1:9/ws", "http://127.0.0.1:9");
    check_and_start_refuse(
        d,
        &receiver_toml(
            url,
            up,
            "did_document = \"carol/did.json\"\nprivate_key = \"alice/key-1_private.pem\"\n",
        ),
        "receiver",
        &["receiver.did_document", "carol/did.json"],
    );
    check_and_start_refuse(
        d,
        &receiver_toml(
            url,
            up,
            "did_document = \"alice/did.json\"\nprivate_key = \"bob/key-1_private.pem\"\n",
        ),
        "receiver",
        &["receiver.private_key", "matches no `authentication` method"],
    );
    std::fs::write(d.join("not-a-key.pem"), "-----BEGIN NOTHING-----\n").unwrap();
    check_and_start_refuse(
        d,
        &receiver_toml(
            url,
            up,
            "did_document = \"alice/did.json\"\nprivate_key = \"not-a-key.pem\"\n",
        ),
        "receiver",
        &["receiver.private_key", "PKCS#8"],
    );
    // The gateway's directory of DID documents.
    check_and_start_refuse(
        d,
        &gateway_toml("[gateway.auth]\ndid_documents_dir = \"no-such-dir\"\n"),
        "gateway",
        &["gateway.auth.did_documents_dir", "no-such-dir"],
    );
}

#[test]
fn check_of_one_side_needs_only_that_sides_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    cert(d, "gw", false);
    // The gateway's files are here; the receiver's CA is not (it lives on
    // the receiver's host).
    let path = write(
        d,
        &format!(
            "{}\n[gateway.tls]\nenabled = true\ncert_file = \"gw.crt\"\nkey_file = \"gw.key\"\n\
             [receiver]\ngateway_url = \"wss://localhost:8443/ws\"\nca_file = \"elsewhere/ca.pem\"\n",
            gateway_toml("")
        ),
    );
    let f = run_to_end("check", &["gateway"], &path);
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stdout.contains(": ok"), "{}", f.stdout);
    failed_naming(
        &run_to_end("check", &["receiver"], &path),
        "check receiver",
        &["receiver.ca_file", "elsewhere/ca.pem"],
    );
    failed_naming(
        &run_to_end("check", &[], &path),
        "check (both sides)",
        &["receiver.ca_file"],
    );
}

#[test]
fn check_print_shows_the_effective_config_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    cert(d, "gw", false);
    let text = format!(
        "{}\n[gateway.tls]\nenabled = true\ncert_file = \"gw.crt\"\nkey_file = \"gw.key\"\n\
         [gateway.database]\nbackend = \"sqlite\"\npassword = \"db-secret-1\"\n\
         [receiver]\ngateway_url = \"wss://localhost:8443/ws\"\nca_file = \"gw.crt\"\ntoken = \"rx-secret-77\"\n",
        gateway_toml("")
    );
    let path = write(d, &text);
    let plain = run_to_end("check", &[], &path);
    assert!(plain.status.success(), "{}", plain.stderr);
    assert!(plain.stdout.contains(": ok"), "{}", plain.stdout);
    let printed = run_to_end("check", &["--print"], &path);
    assert!(printed.status.success(), "{}", printed.stderr);
    let out = &printed.stdout;
    for secret in [TOKEN, "db-secret-1", "rx-secret-77"] {
        assert!(!out.contains(secret), "secret {secret} printed:\n{out}");
    }
    assert!(out.contains("<redacted>"), "{out}");
    // Defaults are filled in; paths are shown as written.
    for line in [
        "max_head_size = 65536",
        "header_timeout = 10.0",
        "cert_file = \"gw.crt\"",
        "ca_file = \"gw.crt\"",
        "backend = \"sqlite\"",
        "max_concurrent = 1024",
    ] {
        assert!(out.contains(line), "expected {line:?} in:\n{out}");
    }
    // What it prints is a configuration `check` accepts.
    let again = write(d, out);
    let f = run_to_end("check", &[], &again);
    assert!(f.status.success(), "{}", f.stderr);
}

#[test]
fn an_unknown_key_gets_the_nearest_one_not_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "[gateway]\nprot = 8089\n");
    let f = run_to_end("check", &[], &path);
    failed_naming(
        &f,
        "unknown key",
        &[
            "gateway.prot",
            "did you mean `port`?",
            "2 | prot = 8089",
            "^^^^",
        ],
    );
    assert!(!f.stderr.contains("expected one of"), "{}", f.stderr);
    assert_eq!(f.stderr.matches("unknown key").count(), 1, "{}", f.stderr);
    // Nothing close: no guess.
    let path = write(dir.path(), "[gateway]\nwibble = 1\n");
    let f = run_to_end("gateway", &[], &path);
    failed_naming(&f, "unknown key", &["unknown key `wibble`"]);
    assert!(!f.stderr.contains("did you mean"), "{}", f.stderr);
    assert!(!f.stderr.contains("expected one of"), "{}", f.stderr);
}

#[test]
fn a_start_error_is_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &receiver_toml("ws://127.0.0.1:9/ws", "ftp://127.0.0.1:9", ""),
    );
    let f = run_to_end("receiver", &[], &path);
    failed_naming(&f, "ftp upstream", &["scheme `ftp://`"]);
    assert_eq!(
        f.stderr.matches("scheme `ftp://`").count(),
        1,
        "said more than once:\n{}",
        f.stderr
    );
    let path = write(
        dir.path(),
        &gateway_toml(
            "[gateway.tls]\nenabled = true\ncert_file = \"a.crt\"\nkey_file = \"a.key\"\n",
        ),
    );
    let f = run_to_end("gateway", &[], &path);
    failed_naming(&f, "missing certificate", &["a.crt"]);
    assert_eq!(f.stderr.matches("a.crt").count(), 1, "{}", f.stderr);
}

#[test]
fn every_subcommand_describes_config_as_what_it_is() {
    for sub in [
        &["gateway"][..],
        &["receiver"],
        &["check"],
        &["routes", "list"],
        &[],
    ] {
        let o = Command::new(binary())
            .args(sub)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && help.contains("--config"),
            "{sub:?}: {help}"
        );
        assert!(
            !help.contains("used when no subcommand is given"),
            "{sub:?}: {help}"
        );
    }
    let o = Command::new(binary())
        .args(["check", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("--print"), "{help}");
}
