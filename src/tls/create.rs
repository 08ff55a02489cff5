//! `anp-proxy cert new NAME…`: a private CA and a certificate it signed
//! for the given host names and IP addresses, so TLS works out of the box:
//! the gateway's `[gateway.tls]` takes the certificate and key, receivers
//! take the CA as `ca_file` and verify the gateway the ordinary way
//! (chain, name, validity; no pinning). With `--client`, the certificate
//! is a receiver's, for a tunnel port with `verify_mode = "required"`
//! (`ca_file` of `[gateway.tunnel_tls]` = this CA).
//!
//! Writes into a directory: `ca.crt`, `ca.key`, `NAME.crt`, `NAME.key`;
//! keys are created with mode 0600. Never overwrites a file, and writes
//! nothing when one exists. The CA's key is kept so that more
//! certificates can be made by other tools; nothing here reuses it.
//!
//! Never: the network, or any file outside the directory.

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("give at least one host name or IP address the certificate is for")]
    NoNames,
    #[error("`{0}` is neither an IP address nor a DNS name")]
    BadName(String),
    #[error("`{0}` is not a file name (letters, digits, `.`, `_`, `-`)")]
    BadFileName(String),
    #[error("{0} exists; not overwriting (choose another --out)")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What `cert new` is asked for.
#[derive(Debug, Clone)]
pub struct CertRequest {
    /// Subject alternative names: DNS names and IP addresses.
    pub names: Vec<String>,
    /// The directory to write into (created if missing).
    pub out: PathBuf,
    /// File stem of the leaf: `NAME.crt` / `NAME.key`.
    pub file_name: String,
    /// Days the leaf is valid (the CA: ten times as long).
    pub days: u32,
    /// A client certificate (a receiver's) instead of a server's.
    pub client: bool,
}

/// The files `cert new` wrote.
#[derive(Debug)]
pub struct Created {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes the CA and the leaf and writes the four files.
pub fn create(req: &CertRequest) -> Result<Created, CertError> {
    let first = req.names.first().ok_or(CertError::NoNames)?;
    for n in &req.names {
        if n.parse::<IpAddr>().is_err() && !is_dns_name(n) {
            return Err(CertError::BadName(n.clone()));
        }
    }
    let stem = &req.file_name;
    let stem_ok = !stem.is_empty()
        && stem != "ca"
        && !stem.starts_with('.')
        && stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !stem_ok {
        return Err(CertError::BadFileName(stem.clone()));
    }
    let created = Created {
        ca_cert: req.out.join("ca.crt"),
        ca_key: req.out.join("ca.key"),
        cert: req.out.join(format!("{stem}.crt")),
        key: req.out.join(format!("{stem}.key")),
    };
    for p in [
        &created.ca_cert,
        &created.ca_key,
        &created.cert,
        &created.key,
    ] {
        if p.exists() {
            return Err(CertError::Exists(p.clone()));
        }
    }

    let now = now();
    let day = time::Duration::days(1);
    let days = |n: u32| time::Duration::days(i64::from(n));
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("anp-proxy private CA ({first})"),
    );
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now - day;
    ca.not_after = now + days(req.days.saturating_mul(10));
    let ca_cert = ca.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(req.names.clone())?;
    leaf.distinguished_name
        .push(DnType::CommonName, first.clone());
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![if req.client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = now - day;
    leaf.not_after = now + days(req.days);
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key)?;

    std::fs::create_dir_all(&req.out).map_err(|source| CertError::Write {
        path: req.out.clone(),
        source,
    })?;
    write_new(&created.ca_key, ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&created.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
    write_new(&created.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&created.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(created)
}

/// A DNS name a certificate can carry: labels of letters, digits and `-`
/// (a leading `*.` for a wildcard), dot-separated.
fn is_dns_name(n: &str) -> bool {
    let n = n.strip_prefix("*.").unwrap_or(n);
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The current time, whole seconds.
fn now() -> time::OffsetDateTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Creates `path` (never replacing one) with `mode`, and writes `bytes`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => CertError::Exists(path.to_owned()),
            _ => CertError::Write {
                path: path.to_owned(),
                source,
            },
        })?;
    f.write_all(bytes).map_err(|source| CertError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn req(dir: &Path, names: &[&str]) -> CertRequest {
        CertRequest {
            names: names.iter().map(|s| s.to_string()).collect(),
            out: dir.join("tls"),
            file_name: "gateway".into(),
            days: 30,
            client: false,
        }
    }

    #[test]
    fn writes_a_ca_and_a_leaf_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let c = create(&req(dir.path(), &["localhost", "127.0.0.1"])).unwrap();
        for k in [&c.ca_key, &c.key] {
            let mode = std::fs::metadata(k).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", k.display());
        }
        let pem = std::fs::read_to_string(&c.cert).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        // Never overwrites.
        let again = create(&req(dir.path(), &["localhost"])).unwrap_err();
        assert!(matches!(again, CertError::Exists(_)), "{again}");
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for names in [&[][..], &["a b"], &["-x.example"], &["x..example"]] {
            assert!(create(&req(dir.path(), names)).is_err(), "{names:?}");
        }
        let mut r = req(dir.path(), &["localhost"]);
        r.file_name = "../x".into();
        assert!(matches!(create(&r), Err(CertError::BadFileName(_))));
        assert!(!dir.path().join("tls").exists(), "nothing written");
    }
}
