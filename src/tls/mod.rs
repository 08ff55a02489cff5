//! TLS with rustls (ring provider) on monoio streams via monoio-rustls
//! (DESIGN.md, "TLS"): the gateway's HTTPS/WSS listeners with optional or
//! required client certificates (`server.rs`), and the receiver's `wss://`
//! dialling with gateway verification and an optional client certificate
//! (`client.rs`); `anp-proxy cert new`'s private CA and certificates
//! (`create.rs`). This module builds configurations once at start and
//! wraps streams; it never decides routing or identity (tunnel auth still
//! runs on the upgrade, on top of TLS).
//!
//! Two properties of monoio-rustls 0.4 the rest of the code must respect:
//! - Its stream implements monoio's `Split`, so `into_split` gives the
//!   usual `Rc<UnsafeCell<_>>` halves. That is sound here because rustls
//!   is only touched between awaits (each half's await is on its own
//!   buffer), but a read that fails on a TLS error tries to send an alert
//!   through the shared session; the connection is dead by then anyway.
//! - A read or write future that is *dropped* (a timeout) leaves the
//!   stream's internal buffer taken; the next IO on it panics. Every
//!   timeout on a TLS stream in this code therefore ends the connection.
//!
//! A TLS session lives in this core's memory, so a TLS tunnel is never
//! handed to another core (`Movable::MOVABLE = false`, `server.rs`).

pub mod client;
pub mod create;
pub mod server;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Errors of building a TLS configuration from files (at start only).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("`{key}` {path}: {message}")]
    Pem {
        key: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("`{key}` {path}: no certificate in the file")]
    NoCertificate { key: &'static str, path: PathBuf },
    // The rustls errors are fields named `error`, not `source`: thiserror
    // would make a `source` the cause, and `{:#}` would say it twice.
    #[error("`{key}`: {error}")]
    Rustls {
        key: &'static str,
        error: rustls::Error,
    },
    #[error("`{key}` {path}: {error}")]
    Verifier {
        key: &'static str,
        path: PathBuf,
        error: rustls::server::VerifierBuilderError,
    },
    #[error("no usable certificate in the system trust store ({0}); set `receiver.ca_file`")]
    NoSystemRoots(String),
}

/// The one crypto provider: ring (already built for ureq; aws-lc-rs needs
/// cmake and a longer C build). Named explicitly so another crate turning
/// on aws-lc-rs cannot make rustls's process default ambiguous.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The largest record rustls may emit (`max_fragment_size`: header and
/// plaintext), so that a whole encrypted record, AEAD tag, TLS 1.3 content
/// type or TLS 1.2 explicit nonce included (at most 24 bytes more), fits
/// the 16 KiB write buffer monoio-rustls copies records into and writes
/// from. At rustls's default (16 KiB of plaintext, 16,406-byte records)
/// every full record went out as two sends, 16,384 bytes and then 22:
/// a 64 KiB HTTPS response took 9.4 sends and as many TCP segments, the
/// 22-byte ones among them, where one per record (~5) does.
pub(crate) const MAX_RECORD: usize = 16 * 1024 - 32;

/// The plaintext of one such record (`MAX_RECORD` less the 5-byte record
/// header): what `net::Writev::send_packed` joins into one write.
pub(crate) const RECORD_PLAINTEXT: usize = MAX_RECORD - 5;

/// All certificates of a PEM file (a chain, leaf first, or a CA bundle).
pub(crate) fn load_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsSetupError::Pem {
            key,
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn load_key(
    key: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsSetupError::Pem {
        key,
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Finds the rustls error inside a failed handshake or read, if any.
pub fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A monoio-rustls handshake error as words (its own `Display` says only
/// "io error" / "rustls error").
pub(crate) fn describe(e: &monoio_rustls::TlsError) -> String {
    match e {
        monoio_rustls::TlsError::Rustls(r) => r.to_string(),
        monoio_rustls::TlsError::Io(io) => match rustls_error(io) {
            Some(r) => r.to_string(),
            None => io.to_string(),
        },
    }
}

/// The handshake's rustls error, if it was one.
pub(crate) fn handshake_rustls_error(e: &monoio_rustls::TlsError) -> Option<&rustls::Error> {
    match e {
        monoio_rustls::TlsError::Rustls(r) => Some(r),
        monoio_rustls::TlsError::Io(io) => rustls_error(io),
    }
}
