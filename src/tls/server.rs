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
use crate::net::{Movable, Readable};

/// The TLS stream a gateway connection runs on.
pub type ServerStream = ServerTlsStream<TcpStream>;

/// rustls may hold decrypted bytes the socket no longer shows: a TLS
/// stream is always "readable" and keeps its read buffer while idle.
impl Readable for ServerStream {
    fn writes_records(&self) -> bool {
        true
    }
}

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
    cfg.max_fragment_size = Some(super::MAX_RECORD);
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
/// A failure (bad or missing client certificate, a stalled peer) is logged
/// at info and the connection dropped: the peer learns why from the TLS
/// alert, not from us. A peer whose first byte is not a TLS handshake
/// record (plain HTTP to an HTTPS port: `curl http://` instead of
/// `https://`) gets a plain-text `400` saying so, which it can read,
/// instead of a connection closed without a word.
pub async fn accept(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    limit: Option<Duration>,
) -> Option<ServerStream> {
    let work = async move {
        match first_byte(&stream).await {
            Some(TLS_HANDSHAKE) => Some(acceptor.accept(stream).await),
            Some(_) => {
                tracing::info!(%peer, "plain HTTP on a TLS port: answered 400");
                // Bounded even when `header_timeout` is off.
                let _ = monoio::time::timeout(PLAIN_LIMIT, answer_plain(stream)).await;
                None
            }
            None => None, // closed (or failed) before its first byte
        }
    };
    let res = match limit {
        Some(d) => match monoio::time::timeout(d, work).await {
            Ok(r) => r,
            Err(_) => {
                tracing::info!(%peer, "TLS handshake timed out");
                return None;
            }
        },
        None => work.await,
    };
    let res = res?;
    match res {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::info!(%peer, error = %describe(&e), "TLS handshake failed");
            None
        }
    }
}

/// The content type of a TLS handshake record (RFC 8446 §5.1): the first
/// byte of every ClientHello.
const TLS_HANDSHAKE: u8 = 0x16;

/// How long a connection that spoke plain text to a TLS port is kept at
/// most (`header_timeout` bounds it too, when set).
const PLAIN_LIMIT: Duration = Duration::from_secs(10);

/// The connection's first byte, left in the socket (`MSG_PEEK`) for the
/// handshake to read; None when the peer closed first or on an error.
async fn first_byte(stream: &TcpStream) -> Option<u8> {
    use crate::net::{peek_byte, Peek};
    loop {
        stream.readable(false).await.ok()?;
        match peek_byte(stream) {
            Peek::Byte(b) => return Some(b),
            Peek::Empty | Peek::Interrupted => {}
            Peek::Closed | Peek::Error => return None,
        }
    }
}

/// What a plain-text client on a TLS port reads.
const PLAIN_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
content-type: text/plain\r\n\
content-length: 70\r\n\
connection: close\r\n\
\r\n\
this port speaks HTTPS: use https:// (receivers: wss://), not http://\n";

/// Reads the plain-text request head (at most 16 KiB), answers
/// [`PLAIN_ANSWER`], and lingers until the client closes (at most 64 KiB
/// more), so that closing with unread bytes does not reset the connection
/// before the client has read the answer. The caller bounds it in time.
async fn answer_plain(mut stream: TcpStream) {
    use monoio::io::{AsyncReadRent as _, AsyncWriteRent as _, AsyncWriteRentExt as _};
    let mut seen = Vec::with_capacity(1024);
    let mut buf = vec![0u8; 4096];
    while seen.len() < 16 * 1024 && memchr::memmem::find(&seen, b"\r\n\r\n").is_none() {
        let (r, b) = stream.read(buf).await;
        buf = b;
        match r {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let (r, _) = stream.write_all(PLAIN_ANSWER).await;
    if r.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut drained = 0usize;
    while drained < 64 * 1024 {
        let (r, b) = stream.read(buf).await;
        buf = b;
        match r {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_answer_is_a_well_formed_response() {
        let text = std::str::from_utf8(PLAIN_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), len, "{body:?}");
        assert!(head.starts_with("HTTP/1.1 400 "));
    }
}
