//! The two URLs a receiver dials: the gateway's `ws(s)://host:port/path`
//! and the local app's `http://host:port`.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path (with query), at least `/`.
    pub path: String,
}

impl Url {
    /// `host:port` for dialling; IPv6 hosts keep their brackets.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The `Host` header value: port omitted when it is the default.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            self.authority()
        }
    }

    /// Host name without brackets (for TLS SNI and DID-WBA `service`).
    pub fn host_name(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid URL `{url}`: {why}")]
pub struct UrlError {
    pub url: String,
    pub why: String,
}

/// Parses `scheme://host[:port][/path]` for the given scheme pair
/// (plain, secure), e.g. ("ws", "wss") or ("http", "https").
pub fn parse(url: &str, schemes: (&str, &str)) -> Result<Url, UrlError> {
    let err = |why: &str| UrlError {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let must = format!("must start with {}:// or {}://", schemes.0, schemes.1);
    let (scheme, rest) = url.split_once("://").ok_or_else(|| err(&must))?;
    let tls = if scheme.eq_ignore_ascii_case(schemes.0) {
        false
    } else if scheme.eq_ignore_ascii_case(schemes.1) {
        true
    } else {
        return Err(err(&format!("scheme `{scheme}://`: {must}")));
    };
    let (auth, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], &rest[i..]),
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    if auth.is_empty() || auth.contains('@') {
        return Err(err("missing or unsupported authority"));
    }
    let (host, port) = if let Some(stripped) = auth.strip_prefix('[') {
        let end = stripped
            .find(']')
            .ok_or_else(|| err("unclosed IPv6 bracket"))?;
        let host = &auth[..end + 2];
        let after = &stripped[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(err("junk after IPv6 address")),
        };
        (host, port)
    } else {
        match auth.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (auth, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| err("invalid port"))?,
        None if tls => 443,
        None => 80,
    };
    if host.is_empty() {
        return Err(err("empty host"));
    }
    Ok(Url {
        tls,
        host: host.to_owned(),
        port,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        let u = parse("ws://127.0.0.1:8089/ws", ("ws", "wss")).unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (false, "127.0.0.1", 8089, "/ws")
        );
        let u = parse("wss://gw.example.com/tunnel?x=1", ("ws", "wss")).unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/tunnel?x=1"));
        assert_eq!(u.host_header(), "gw.example.com");
        let u = parse("http://[::1]:8000", ("http", "https")).unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("[::1]", 8000, "/")
        );
        assert_eq!(u.host_name(), "::1");
        assert!(parse("ftp://x", ("http", "https")).is_err());
        assert!(parse("http://:80", ("http", "https")).is_err());
        assert!(parse("http://h:99999", ("http", "https")).is_err());
    }
}
