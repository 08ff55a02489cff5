//! `did:wba` identifiers: syntax, where their documents live, and the
//! key-bound last segment (`e1_…`, `k1_…`) that anp 1.x appends.
//!
//! `did:wba:example.com:user:alice` → `https://example.com/user/alice/did.json`;
//! `did:wba:example.com` → `https://example.com/.well-known/did.json`; a port
//! is written `%3A` inside the host part (`did:wba:example.com%3A8800:…`).
//! The same path maps into `did_documents_dir` (`DIR/example.com/user/alice/did.json`).
//! Segments are checked strictly because they become URL paths and file
//! names: no `.`/`..`, no `/`, `\`, `?`, `#`, only a conservative set of bytes.

use std::path::{Path, PathBuf};

use super::error::DidAuthError;

/// Longest DID accepted (the header line limit bounds it anyway).
pub const MAX_DID_LEN: usize = 1024;

/// A parsed `did:wba` DID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DidWba<'a> {
    pub did: &'a str,
    /// Host name, lowercase as written; no port.
    pub host: String,
    pub port: Option<u16>,
    pub path: Vec<&'a str>,
}

/// Which key a key-bound DID's last segment commits to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding<'a> {
    /// `e1_<RFC 7638 thumbprint of the Ed25519 OKP JWK>`
    E1(&'a str),
    /// `k1_<RFC 7638 thumbprint of the secp256k1 EC JWK>`
    K1(&'a str),
}

pub fn parse(did: &str) -> Result<DidWba<'_>, DidAuthError> {
    let bad = |why: &str| DidAuthError::InvalidDid(format!("{why}: `{}`", truncate(did)));
    if did.len() > MAX_DID_LEN {
        return Err(bad("too long"));
    }
    let rest = did
        .strip_prefix("did:wba:")
        .ok_or_else(|| bad("must start with did:wba:"))?;
    let mut parts = rest.split(':');
    let authority = parts.next().unwrap_or("");
    let (host, port) = parse_authority(authority).ok_or_else(|| bad("bad host"))?;
    let path: Vec<&str> = parts.collect();
    for seg in &path {
        if seg.is_empty() || *seg == "." || *seg == ".." || !seg.bytes().all(segment_byte) {
            return Err(bad("bad path segment"));
        }
    }
    Ok(DidWba {
        did,
        host,
        port,
        path,
    })
}

/// `host` or `host%3Aport` (any case of the escape).
fn parse_authority(a: &str) -> Option<(String, Option<u16>)> {
    let lower = a.to_ascii_lowercase();
    let (host, port) = match lower.split_once("%3a") {
        Some((h, p)) => {
            if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) || p.len() > 5 {
                return None;
            }
            (
                h.to_owned(),
                Some(p.parse::<u16>().ok().filter(|p| *p != 0)?),
            )
        }
        None => (lower, None),
    };
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        });
    ok.then_some((host, port))
}

fn segment_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~' | b'%' | b'@' | b'+')
}

impl<'a> DidWba<'a> {
    /// `host` or `host:port`, as in the document's URL.
    pub fn authority(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        }
    }

    /// The document's path under the origin: `/user/alice/did.json` or
    /// `/.well-known/did.json`.
    pub fn document_path(&self) -> String {
        if self.path.is_empty() {
            "/.well-known/did.json".into()
        } else {
            format!("/{}/did.json", self.path.join("/"))
        }
    }

    /// `https://{authority}{document_path}`: where the document really lives.
    pub fn https_url(&self) -> String {
        format!("https://{}{}", self.authority(), self.document_path())
    }

    /// The document's file under an offline documents directory.
    pub fn file_in(&self, dir: &Path) -> PathBuf {
        let mut p = dir.join(self.authority());
        if self.path.is_empty() {
            p.push(".well-known");
        } else {
            for s in &self.path {
                p.push(s);
            }
        }
        p.push("did.json");
        p
    }

    /// The key binding the last path segment carries, if any (a DID
    /// without path segments carries none, as in anp's verifier).
    pub fn binding(&self) -> Option<Binding<'a>> {
        let last = *self.path.last()?;
        if let Some(t) = last.strip_prefix("e1_") {
            Some(Binding::E1(t))
        } else {
            last.strip_prefix("k1_").map(Binding::K1)
        }
    }
}

pub(crate) fn truncate(s: &str) -> &str {
    match s.char_indices().nth(120) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let d = parse("did:wba:example.com:user:alice").unwrap();
        assert_eq!(d.https_url(), "https://example.com/user/alice/did.json");
        assert_eq!(
            d.file_in(Path::new("/docs")),
            PathBuf::from("/docs/example.com/user/alice/did.json")
        );
        let d = parse("did:wba:example.com").unwrap();
        assert_eq!(d.https_url(), "https://example.com/.well-known/did.json");
        assert_eq!(
            d.file_in(Path::new("/docs")),
            PathBuf::from("/docs/example.com/.well-known/did.json")
        );
        let d = parse("did:wba:Example.com%3a8800:a").unwrap();
        assert_eq!(d.https_url(), "https://example.com:8800/a/did.json");
        assert_eq!(d.binding(), None);
    }

    #[test]
    fn bindings() {
        let d = parse("did:wba:example.com:user:e1_abc").unwrap();
        assert_eq!(d.binding(), Some(Binding::E1("abc")));
        let d = parse("did:wba:example.com:k1_xyz").unwrap();
        assert_eq!(d.binding(), Some(Binding::K1("xyz")));
    }

    #[test]
    fn refuses_unsafe_dids() {
        for d in [
            "did:web:example.com",
            "did:wba:",
            "did:wba:example.com:..:etc",
            "did:wba:example.com:a/b",
            "did:wba:example.com::a",
            "did:wba:exa_mple.com",
            "did:wba:example.com%3A",
            "did:wba:example.com%3A99999",
            "did:wba:example.com%2Fx",
            "did:wba:example.com:a#key-1",
            "did:wba:example.com:a?x",
        ] {
            assert!(parse(d).is_err(), "{d}");
        }
    }
}
