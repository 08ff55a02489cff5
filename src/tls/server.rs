//! The gateway's TLS listeners: a `rustls::ServerConfig` per `[gateway.tls]`
//! / `[gateway.tunnel_tls]` table, and the accept step that runs the
//! handshake under a deadline before the connection reaches
//! `gateway::conn::serve_conn`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::TcpStream;
use monoio_rustls::{ServerTlsStream, TlsAcceptor};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::{describe, load_certs, load_key, provider, TlsSetupError};
use crate::config::{TlsConfig, VerifyMode};
use crate::net::Movable;

/// The TLS stream a gateway connection runs on.
pub type ServerStream = ServerTlsStream<TcpStream>;

/// A TLS session's state (keys, sequence numbers, buffered records) lives
/// in this core's memory: only the bare socket could move, and it would
/// be useless without them. TLS tunnels stay on the core that accepted
/// them; placement falls back to cross-core dispatch for them.
impl Movable for ServerStream {
    const MOVABLE: bool = false;
    fn into_owned_fd(self) -> Result<std::os::fd::OwnedFd, Self> {
        Err(self)
    }
}

/// Builds the listener configuration of one TLS table (`section` names it
/// in errors: `gateway.tls` or `gateway.tunnel_tls`); relative paths
/// resolve from `base_dir`. Call only when `t.enabled`.
pub fn server_config(
    section: Section,
    t: &TlsConfig,
    base_dir: &Path,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let keys = section.keys();
    let certs = load_certs(keys.cert_file, &base_dir.join(&t.cert_file))?;
    let key = load_key(keys.key_file, &base_dir.join(&t.key_file))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsSetupError::Rustls {
            key: keys.section,
            error,
        })?;
    let builder = match t.verify_mode {
        VerifyMode::None => builder.with_no_client_auth(),
        mode => {
            let path = base_dir.join(&t.ca_file);
            let mut roots = RootCertStore::empty();
            for c in load_certs(keys.ca_file, &path)? {
                roots.add(c).map_err(|error| TlsSetupError::Rustls {
                    key: keys.ca_file,
                    error,
                })?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let v = if mode == VerifyMode::Optional {
                v.allow_unauthenticated()
            } else {
                v
            };
            let verifier = v.build().map_err(|error| TlsSetupError::Verifier {
                key: keys.ca_file,
                path,
                error,
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|error| TlsSetupError::Rustls {
            key: keys.key_file,
            error,
        })?;
    // Only HTTP/1.1 (and WebSocket over it) is spoken here; a client that
    // offers ALPN without it is refused in the handshake, not misparsed.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Which table a configuration came from, for error messages.
#[derive(Debug, Clone, Copy)]
pub enum Section {
    Gateway,
    Tunnel,
}

struct Keys {
    section: &'static str,
    cert_file: &'static str,
    key_file: &'static str,
    ca_file: &'static str,
}

impl Section {
    fn keys(self) -> Keys {
        match self {
            Section::Gateway => Keys {
                section: "gateway.tls",
                cert_file: "gateway.tls.cert_file",
                key_file: "gateway.tls.key_file",
                ca_file: "gateway.tls.ca_file",
            },
            Section::Tunnel => Keys {
                section: "gateway.tunnel_tls",
                cert_file: "gateway.tunnel_tls.cert_file",
                key_file: "gateway.tunnel_tls.key_file",
                ca_file: "gateway.tunnel_tls.ca_file",
            },
        }
    }
}

/// Runs the server handshake on an accepted socket, bounded by `limit`.
/// A failure (bad or missing client certificate, plain HTTP on a TLS port,
/// a stalled peer) is logged at info and the connection dropped: the peer
/// learns why from the TLS alert, not from us.
pub async fn accept(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    limit: Option<Duration>,
) -> Option<ServerStream> {
    let hs = acceptor.accept(stream);
    let res = match limit {
        Some(d) => match monoio::time::timeout(d, hs).await {
            Ok(r) => r,
            Err(_) => {
                tracing::info!(%peer, "TLS handshake timed out");
                return None;
            }
        },
        None => hs.await,
    };
    match res {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::info!(%peer, error = %describe(&e), "TLS handshake failed");
            None
        }
    }
}
