//! Everything a start needs from the local disk and from the config's URLs,
//! checked and loaded in **one** place: the files the config names exist
//! and parse (certificates, keys, DID documents, private keys), keys match
//! their certificates, URL schemes are ones the program speaks.
//!
//! `anp-proxy check` runs [`gateway`] and [`receiver`] and throws the
//! results away; `gateway::start`, the gateway's SIGHUP reload and
//! `receiver::run` run the same functions and use what they loaded. So
//! what `check` accepts, a start accepts: the two cannot drift.
//!
//! Never: the network (no DNS lookup, no connection, no database server),
//! writing a file, or logging (findings are returned; the caller prints or
//! logs them).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::auth::didwba::{self, DidSigner};
use crate::config::Config;
use crate::gateway::accept::{self, Acceptors};
use crate::receiver::app_conn::{self, AppTarget, UpstreamUrl};
use crate::receiver::url::{self, Url, UrlError};
use crate::tls::client::Dialer;
use crate::tls::TlsSetupError;

/// Why a configuration cannot start, naming the key (and the file).
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    // Fields named so that thiserror takes none as the error's source:
    // the message already says it, and `{:#}` would say it twice.
    #[error("{key}: {error}")]
    Url { key: &'static str, error: UrlError },
    #[error("{0}")]
    Upstream(String),
    #[error("receiver.gateway_url: host `{0}` is not a valid TLS server name")]
    ServerName(String),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("receiver.did_document / receiver.private_key: {0}")]
    Did(didwba::sign::SignError),
    #[error("gateway.auth.did_documents_dir {}: {why}", path.display())]
    DocumentsDir { path: PathBuf, why: String },
}

/// What a gateway loads before it binds: the TLS acceptors of its ports.
pub struct GatewayPlan {
    pub acceptors: Acceptors,
    /// Findings that do not stop a start (logged at start, printed by
    /// `check`).
    pub warnings: Vec<String>,
}

/// What a receiver loads before it dials: both URLs, the TLS dialer
/// (`wss://`), and the DID signer when it proves a DID.
pub struct ReceiverPlan {
    /// Every `gateway_url`, each with its dialer when it is `wss://`.
    pub gateways: Vec<(Url, Option<Dialer>)>,
    pub upstream: AppTarget,
    pub did: Option<Arc<DidSigner>>,
    pub warnings: Vec<String>,
}

/// The gateway's side of `cfg`: `[gateway.tls]` and `[gateway.tunnel_tls]`
/// certificates, keys and CAs (loaded into the acceptors a start uses),
/// and `[gateway.auth] did_documents_dir`.
pub fn gateway(cfg: &Config) -> Result<GatewayPlan, PreflightError> {
    let acceptors = accept::load_acceptors(cfg)?;
    let mut warnings = Vec::new();
    // A certificate and key written but the table left off serves plain
    // HTTP: say so, rather than let the start line's `http://` be the clue.
    let g = &cfg.gateway;
    for (table, t) in [("tls", Some(&g.tls)), ("tunnel_tls", g.tunnel_tls.as_ref())] {
        let Some(t) = t else { continue };
        let files = !t.cert_file.is_empty() || !t.key_file.is_empty();
        if files && !t.enabled {
            warnings.push(format!(
                "gateway.{table}: cert_file / key_file are set but enabled = false: \
                 its port serves plain HTTP and ws:// (set enabled = true for TLS)"
            ));
        }
    }
    let a = &cfg.gateway.auth;
    if a.did_wba_enabled && !a.did_documents_dir.is_empty() {
        // The only source of documents when set (DidAuth::from_config): a
        // directory that is not there refuses every DID proof.
        let dir = cfg.base_dir.join(&a.did_documents_dir);
        if !dir.is_dir() {
            let why = match std::fs::metadata(&dir) {
                Ok(_) => "not a directory".to_owned(),
                Err(e) => e.to_string(),
            };
            return Err(PreflightError::DocumentsDir { path: dir, why });
        }
        // Documents are read per upgrade (an edit applies at once), so a
        // missing one is a warning: it may be written later.
        for d in &a.dids {
            let Ok(did) = didwba::did::parse(&d.did) else {
                continue; // refused by Config::validate already
            };
            let path = did.file_in(&dir);
            if let Err(e) = document_file(&path) {
                warnings.push(format!(
                    "gateway.auth.dids `{}`: {}: {e}; its tunnels will be refused",
                    d.did,
                    path.display()
                ));
            }
        }
    }
    Ok(GatewayPlan {
        acceptors,
        warnings,
    })
}

/// `upstream` (`http://`, `https://` with its trust loaded, `unix:`) and
/// `upstream_host`, ready to dial.
fn upstream(cfg: &Config) -> Result<AppTarget, PreflightError> {
    let r = &cfg.receiver;
    let url = app_conn::parse(&r.upstream).map_err(|error| PreflightError::Url {
        key: "receiver.upstream",
        error,
    })?;
    let tls = match &url {
        UpstreamUrl::Net(u) if u.tls => {
            Some(crate::tls::client::upstream_config(r, &cfg.base_dir)?)
        }
        _ => None,
    };
    AppTarget::new(url, &r.upstream_host, tls).map_err(PreflightError::Upstream)
}

/// A DID document file: readable, a JSON object (what the resolver asks).
fn document_file(path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    didwba::resolve::parse_document(&bytes)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The receiver's side of `cfg`: `gateway_url` (`ws://` or `wss://`),
/// `upstream` (`http://`, `https://` with its CA, `unix:`), the TLS files for `wss://` (`ca_file`, or the
/// system trust store; `cert_file`/`key_file`, matching), and the DID
/// document with its private key.
pub fn receiver(cfg: &Config) -> Result<ReceiverPlan, PreflightError> {
    let r = &cfg.receiver;
    let mut warnings = Vec::new();
    let mut gateways = Vec::with_capacity(r.gateway_url.len());
    for u in r.gateway_url.iter() {
        let gateway = url::parse(u, ("ws", "wss")).map_err(|error| PreflightError::Url {
            key: "receiver.gateway_url",
            error,
        })?;
        gateways.push(gateway);
    }
    let upstream = upstream(cfg)?;
    // One client configuration for every core and gateway, built before
    // any tunnel so a bad file stops the start with its key named.
    let tls = if gateways.iter().any(|g| g.tls) {
        Some(crate::tls::client::client_config(r, &cfg.base_dir)?)
    } else {
        if !r.ca_file.is_empty() || !r.cert_file.is_empty() {
            warnings.push(
                "receiver.ca_file / cert_file are ignored: gateway_url is not wss://".to_owned(),
            );
        }
        None
    };
    let gateways = gateways
        .into_iter()
        .map(|gateway| {
            let dialer = match (&tls, gateway.tls) {
                (Some(tls), true) => Some(
                    Dialer::new(tls.clone(), gateway.host_name())
                        .map_err(|_| PreflightError::ServerName(gateway.host_name().to_owned()))?,
                ),
                _ => None,
            };
            Ok((gateway, dialer))
        })
        .collect::<Result<Vec<_>, PreflightError>>()?;
    let did = if r.did_document.is_empty() {
        None
    } else {
        let signer = DidSigner::load(
            &cfg.base_dir.join(&r.did_document),
            &cfg.base_dir.join(&r.private_key),
        )
        .map_err(PreflightError::Did)?;
        Some(Arc::new(signer))
    };
    Ok(ReceiverPlan {
        gateways,
        upstream,
        did,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str, dir: &Path) -> Config {
        let mut c = Config::parse(text, Path::new("x.toml")).unwrap();
        c.base_dir = dir.to_owned();
        c
    }

    #[test]
    fn urls_are_checked_without_the_network() {
        let dir = tempfile::tempdir().unwrap();
        for (text, want) in [
            (
                "[receiver]\ngateway_url = 'http://gw.example/ws'\n",
                "receiver.gateway_url",
            ),
            (
                "[receiver]\nupstream = 'https://127.0.0.1:8000'\nupstream_ca_file = 'no.crt'\n",
                "receiver.upstream_ca_file",
            ),
            (
                "[receiver]\nupstream = 'unix:/s'\nupstream_host = 'a b'\n",
                "receiver.upstream_host",
            ),
            ("[receiver]\nupstream = 'ftp://x'\n", "receiver.upstream"),
        ] {
            let e = receiver(&cfg(text, dir.path())).err().expect(text);
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
        // Unresolvable host names are fine: no lookup happens here.
        let ok = receiver(&cfg(
            "[receiver]\ngateway_url = 'ws://no-such-host.invalid/ws'\n",
            dir.path(),
        ))
        .unwrap();
        assert!(ok.gateways.iter().all(|(_, d)| d.is_none()) && ok.did.is_none());
        // A fleet: every URL checked, the bad one named.
        let ok = receiver(&cfg(
            "[receiver]\ngateway_url = ['ws://a.invalid/ws', 'ws://b.invalid:9/ws']\n",
            dir.path(),
        ))
        .unwrap();
        assert_eq!(ok.gateways.len(), 2);
        assert_eq!(ok.gateways[1].0.authority(), "b.invalid:9");
        let e = receiver(&cfg(
            "[receiver]\ngateway_url = 'ws://a.invalid/ws, http://b.invalid/ws'\n",
            dir.path(),
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("receiver.gateway_url") && e.contains("http://b.invalid"),
            "{e}"
        );
    }

    #[test]
    fn missing_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let e = gateway(&cfg(
            "[gateway.tls]\nenabled = true\ncert_file = 'nope.crt'\nkey_file = 'nope.key'\n",
            dir.path(),
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("gateway.tls.cert_file") && e.contains("nope.crt"),
            "{e}"
        );
        let e = receiver(&cfg(
            "[receiver]\ngateway_url = 'wss://gw.example/ws'\nca_file = 'ca.pem'\n",
            dir.path(),
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("receiver.ca_file") && e.contains("ca.pem"),
            "{e}"
        );
        let e = receiver(&cfg(
            "[receiver]\ndid_document = 'did.json'\nprivate_key = 'k.pem'\n",
            dir.path(),
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("receiver.did_document") && e.contains("did.json"),
            "{e}"
        );
        let e = gateway(&cfg(
            "[gateway.auth]\ndid_documents_dir = 'dids'\n",
            dir.path(),
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("did_documents_dir") && e.contains("dids"), "{e}");
    }

    #[test]
    fn a_missing_did_document_in_the_directory_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("dids")).unwrap();
        let plan = gateway(&cfg(
            "[gateway.auth]\ndid_documents_dir = 'dids'\n[[gateway.auth.dids]]\ndid = 'did:wba:a.example:x'\npaths = ['/x']\n",
            dir.path(),
        ))
        .unwrap();
        assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
        assert!(plan.warnings[0].contains("did:wba:a.example:x"));
    }

    /// A TLS table with its files written but left off serves plain HTTP,
    /// and says so; the shipped shape (off, no files) says nothing.
    #[test]
    fn tls_files_without_enabled_are_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let warned = |text: &str| gateway(&cfg(text, dir.path())).unwrap().warnings;
        let w = warned("[gateway.tls]\nenabled = false\ncert_file = 'a.crt'\nkey_file = 'a.key'\n");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("gateway.tls:") && w[0].contains("enabled = false"),
            "{w:?}"
        );
        let w = warned("[gateway]\ntunnel_port = 0\n[gateway.tunnel_tls]\ncert_file = 'a.crt'\n");
        assert!(
            w.len() == 1 && w[0].contains("gateway.tunnel_tls:"),
            "{w:?}"
        );
        assert_eq!(
            warned("[gateway.tls]\nenabled = false\ncert_file = ''\n"),
            Vec::<String>::new()
        );
    }
}
