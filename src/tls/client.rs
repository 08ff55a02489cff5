//! The receiver's side: a `rustls::ClientConfig` that trusts `[receiver]
//! ca_file` (or the system trust store) and presents `cert_file` when set,
//! and [`GatewayStream`], the one stream type a tunnel runs on whether the
//! gateway URL is `ws://` or `wss://`.

use std::path::Path;
use std::sync::Arc;

use monoio::io::Split;
use monoio::net::TcpStream;
use monoio_rustls::{ClientTlsStream, TlsConnector};
use rustls::client::WantsClientCert;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ConfigBuilder, RootCertStore};

use super::verify::GatewayVerifier;
use super::{describe, handshake_rustls_error, load_certs, load_key, provider, TlsSetupError};
use crate::config::ReceiverConfig;

/// Builds the receiver's TLS configuration (relative paths from
/// `base_dir`).
///
/// Trust: `ca_file` when set (a certificate of it presented as the
/// gateway's own is accepted too: `tls/verify.rs`), else the operating
/// system's store
/// (rustls-native-certs: `/etc/ssl/certs` and friends, `SSL_CERT_FILE`),
/// so an operator's own CA installed system-wide works without a key in
/// our config. We do not bundle webpki-roots: a gateway behind a private
/// CA is the common case, and a compiled-in list would silently go stale.
pub fn client_config(
    r: &ReceiverConfig,
    base_dir: &Path,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let builder = trusting(&r.ca_file, "receiver.ca_file", base_dir)?;
    let mut cfg = if r.cert_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let certs = load_certs("receiver.cert_file", &base_dir.join(&r.cert_file))?;
        let key = load_key("receiver.key_file", &base_dir.join(&r.key_file))?;
        builder
            .with_client_auth_cert(certs, key)
            .map_err(|error| TlsSetupError::Rustls {
                key: "receiver.key_file",
                error,
            })?
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.max_fragment_size = Some(super::MAX_RECORD);
    Ok(Arc::new(cfg))
}

/// The receiver's TLS configuration towards an `https://` app: trust in
/// `upstream_ca_file`, else `ca_file` (one private CA for both is the
/// common case: `anp-proxy cert new` makes one), else the system's store;
/// no client certificate.
pub fn upstream_config(
    r: &ReceiverConfig,
    base_dir: &Path,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let (file, key) = if r.upstream_ca_file.is_empty() {
        (&r.ca_file, "receiver.ca_file")
    } else {
        (&r.upstream_ca_file, "receiver.upstream_ca_file")
    };
    let mut cfg = trusting(file, key, base_dir)?.with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.max_fragment_size = Some(super::MAX_RECORD);
    Ok(Arc::new(cfg))
}

/// A client configuration builder that trusts `ca_file` (named `key` in
/// errors; a certificate of it presented as the server's own is accepted
/// too: `tls/verify.rs`), or the system's store when it is empty.
fn trusting(
    ca_file: &str,
    key: &'static str,
    base_dir: &Path,
) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, TlsSetupError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsSetupError::Rustls {
            key: "receiver",
            error,
        })?;
    if ca_file.is_empty() {
        let mut roots = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "it is empty".into());
            return Err(TlsSetupError::NoSystemRoots(why));
        }
        return Ok(builder.with_root_certificates(roots));
    }
    // webpki against ca_file, and a self-signed certificate that is itself
    // in ca_file accepted as pinned (tls/verify.rs).
    let path = base_dir.join(ca_file);
    let pinned = load_certs(key, &path)?;
    let mut roots = RootCertStore::empty();
    for c in &pinned {
        roots
            .add(c.clone())
            .map_err(|error| TlsSetupError::Rustls { key, error })?;
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|error| TlsSetupError::Verifier { key, path, error })?;
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(GatewayVerifier::new(webpki, pinned))))
}

/// What a receiver needs to dial `wss://`: the connector and the name the
/// gateway's certificate must carry (SNI; an IP address is checked
/// against the certificate's IP SANs).
#[derive(Clone)]
pub struct Dialer {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

impl Dialer {
    pub fn new(
        cfg: Arc<ClientConfig>,
        host_name: &str,
    ) -> Result<Self, rustls::pki_types::InvalidDnsNameError> {
        Ok(Self {
            connector: TlsConnector::from(cfg),
            server_name: ServerName::try_from(host_name.to_owned())?,
        })
    }

    /// The client handshake on a connected socket.
    pub async fn handshake(&self, tcp: TcpStream) -> Result<GatewayStream, HandshakeError> {
        let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        match self.connector.connect(self.server_name.clone(), tcp).await {
            Ok(s) => Ok(GatewayStream::Tls(Box::new(s))),
            Err(e) => Err(HandshakeError::from_tls(&e, &peer)),
        }
    }
}

/// Why the TLS handshake with the gateway failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The gateway's certificate does not chain to our roots, names
    /// another host, or has expired.
    #[error("gateway certificate not trusted: {0}")]
    Untrusted(String),
    /// The gateway asks for a client certificate we lack, or does not
    /// trust ours (TLS 1.3 says so only after our handshake finished, on
    /// the first read).
    #[error("gateway refused our client certificate ({0}); see receiver.cert_file / key_file")]
    ClientCertRefused(String),
    /// Our ClientHello was answered with something that is not a TLS
    /// record (a plain HTTP `400`, typically): `wss://` to a port that
    /// speaks plain TCP.
    #[error(
        "the gateway at {0} does not speak TLS on that port (it answered in plain text): \
         use ws:// for it, or the port where the gateway has [gateway.tls] enabled"
    )]
    NotTls(String),
    #[error("TLS handshake with the gateway failed: {0}")]
    Other(String),
}

impl HandshakeError {
    /// `peer`: the address dialled, for the message.
    fn from_tls(e: &monoio_rustls::TlsError, peer: &str) -> Self {
        match handshake_rustls_error(e) {
            Some(rustls::Error::InvalidCertificate(c)) => Self::Untrusted(format!("{c:?}")),
            // The first bytes back were not a TLS record header (rustls
            // reads the content type first: `H` of `HTTP/1.1` is none).
            Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
                Self::NotTls(peer.to_owned())
            }
            Some(r) => Self::from_rustls(r).unwrap_or_else(|| Self::Other(describe(e))),
            None => Self::Other(describe(e)),
        }
    }

    /// A read error after the handshake that is really the gateway
    /// refusing our certificate; `None` for anything else.
    pub fn from_io(e: &std::io::Error) -> Option<Self> {
        Self::from_rustls(super::rustls_error(e)?)
    }

    fn from_rustls(r: &rustls::Error) -> Option<Self> {
        use rustls::AlertDescription as A;
        match r {
            rustls::Error::AlertReceived(
                a @ (A::CertificateRequired
                | A::BadCertificate
                | A::UnknownCA
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::CertificateUnknown
                | A::UnsupportedCertificate
                | A::AccessDenied),
            ) => Some(Self::ClientCertRefused(format!("alert {a:?}"))),
            _ => None,
        }
    }
}

/// The stream of one tunnel: plain TCP (`ws://`) or TLS (`wss://`).
pub enum GatewayStream {
    Plain(TcpStream),
    // Boxed: the TLS stream carries two 16 KiB buffer headers and the
    // session; the enum stays small either way.
    Tls(Box<ClientTlsStream<TcpStream>>),
}

// SAFETY: both variants are `Split` (TcpStream is; monoio-rustls's stream
// is when its IO is), and the enum adds no state shared between halves.
unsafe impl Split for GatewayStream {}

/// Plain TCP waits for readiness; TLS returns at once (rustls may hold
/// decrypted bytes the socket no longer shows).
impl crate::net::Readable for GatewayStream {
    async fn wait_readable(&self) -> std::io::Result<()> {
        match self {
            GatewayStream::Plain(s) => s.readable(false).await,
            GatewayStream::Tls(_) => Ok(()),
        }
    }
}

crate::net::delegate_rent_io!(GatewayStream { Plain, Tls });

#[cfg(test)]
mod tests {
    use super::*;

    /// The receiver's records (its `wss://` tunnel, its `https://`
    /// upstream) fit monoio-rustls's 16 KiB write buffer as the gateway's
    /// do, which `tls_e2e::https_records_each_fit_one_16k_write` sees on
    /// the wire: a record one byte over it goes out as two sends.
    #[test]
    fn the_receivers_tls_configurations_cap_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["gw.test".to_string()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        let r = ReceiverConfig {
            ca_file: "ca.pem".into(),
            ..ReceiverConfig::default()
        };
        let tunnel = client_config(&r, dir.path()).unwrap();
        let upstream = upstream_config(&r, dir.path()).unwrap();
        for cfg in [tunnel, upstream] {
            assert_eq!(cfg.max_fragment_size, Some(super::super::MAX_RECORD));
        }
    }
}
